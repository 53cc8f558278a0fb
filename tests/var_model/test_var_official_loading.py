"""load_official_var: official key layout, configuration inferred from shapes, strict keys."""

from __future__ import annotations

import pytest
import torch
from var_helpers import tiny_pair

from var_model import VAR, VAR_PRESETS, load_official_var
from var_model.official_var import config_from_state_dict


@pytest.mark.parametrize(
    "fields",
    [
        dict(scales=(1, 2, 4)),
        dict(scales=(1, 2, 3, 4), shared_adaln=True),
        dict(scales=(1, 2, 4), attn_l2_norm=False, num_heads=2, num_layers=2),
        dict(scales=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), num_classes=1000, codebook_size=64, mlp_ratio=2.0),
    ],
)
def test_round_trip_through_an_official_checkpoint_file(tmp_path, fields):
    var, _ = tiny_pair(**fields)
    path = tmp_path / "var_tiny.pth"
    torch.save(var.state_dict(), path)
    # Without QK-norm the heads are not in the shapes: they are given (issue 15).
    loaded = load_official_var(path, num_heads=None if var.config.attn_l2_norm else var.config.num_heads)
    assert not loaded.training
    for name in ("hidden_size", "num_layers", "num_heads", "mlp_ratio", "scales", "codebook_size", "embed_dim",
                 "num_classes", "attn_l2_norm", "shared_adaln"):
        assert getattr(loaded.config, name) == getattr(var.config, name), name
    labels = torch.tensor([0, 5])
    teacher_input = torch.randn(2, var.num_tokens - 1, var.config.embed_dim)
    with torch.no_grad():
        assert torch.equal(loaded(labels, teacher_input), var(labels, teacher_input))


def test_official_schedules_are_inferred_from_the_sequence_length():
    for preset, length in (("d16", 680), ("d36-s", 2240)):
        with torch.device("meta"):
            state = VAR(VAR_PRESETS[preset]).state_dict()
        # Meta tensors carry shapes only; the level of every position must be real to be counted.
        scales = VAR_PRESETS[preset].scales
        state["lvl_1L"] = torch.cat([torch.full((s * s,), i) for i, s in enumerate(scales)]).view(1, -1)
        config = config_from_state_dict(state)
        assert config.total_tokens == length
        assert config == VAR_PRESETS[preset]


def test_missing_and_unexpected_keys_are_named(tmp_path):
    var, _ = tiny_pair((1, 2, 4))
    state = var.state_dict()
    missing = dict(state)
    del missing["blocks.1.attn.v_bias"]
    with pytest.raises(KeyError, match=r"missing keys \['blocks.1.attn.v_bias'\], unexpected keys \[\]"):
        load_official_var(missing)
    extra = dict(state, **{"blocks.0.attn.k_bias": torch.zeros(32)})
    with pytest.raises(KeyError, match=r"unexpected keys \['blocks.0.attn.k_bias'\]"):
        load_official_var(extra)
    wrong_shape = dict(state, **{"blocks.0.ffn.fc2.bias": torch.zeros(31)})
    with pytest.raises(ValueError, match="blocks.0.ffn.fc2.bias"):
        load_official_var(wrong_shape)
    with pytest.raises(KeyError, match="not an official VAR state dict"):
        load_official_var({"weight": torch.zeros(1)})


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state": object()}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_official_var(path)
