"""TokenizerConfig validation, serialisation, presets and the official parameter count."""

from __future__ import annotations

import pytest
import torch

from var_model import TOKENIZER_PRESETS, VQVAE, TokenizerConfig


def test_official_256_preset_has_the_official_parameter_count_and_keys():
    config = TOKENIZER_PRESETS["official-256"]
    assert (config.base_channels, config.channel_multipliers, config.embed_dim, config.codebook_size) == (
        160, (1, 1, 2, 2, 4), 32, 4096)
    assert config.scales == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) and config.total_tokens == 680
    with torch.device("meta"):  # shapes only: no 436 MB allocation
        model = VQVAE(config)
    assert sum(p.numel() for p in model.parameters()) == 108_948_355
    assert sum(p.numel() for p in model.quantize.parameters()) == 168_064
    state = model.state_dict()
    assert len(state) == 324  # the official checkpoint's key count
    assert state["quantize.ema_vocab_hit_SV"].shape == (10, 4096)
    for key in ("encoder.down.4.attn.1.qkv.weight", "encoder.down.3.downsample.conv.weight",
                "decoder.up.4.attn.2.proj_out.bias", "decoder.up.1.upsample.conv.weight",
                "encoder.down.2.block.0.nin_shortcut.weight", "quantize.quant_resi.qresi_ls.3.bias"):
        assert key in state, key
    assert "decoder.up.0.upsample.conv.weight" not in state and "encoder.down.4.downsample.conv.weight" not in state


def test_official_512_preset_uses_the_512_schedule():
    config = TOKENIZER_PRESETS["official-512"]
    assert config.latent_size == 32 and config.scales == (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def test_every_preset_builds_and_round_trips_through_a_dict():
    for name, config in TOKENIZER_PRESETS.items():
        assert TokenizerConfig.from_dict(config.to_dict()) == config, name
        assert config.image_size == config.latent_size * config.downsample_factor, name


def test_from_dict_accepts_lists_and_rejects_unknown_fields():
    data = TOKENIZER_PRESETS["tiny"].to_dict()
    assert isinstance(data["scales"], list)
    assert TokenizerConfig.from_dict(data).scales == TOKENIZER_PRESETS["tiny"].scales
    with pytest.raises(ValueError, match="^patch_nums: unknown TokenizerConfig field"):
        TokenizerConfig.from_dict({**data, "patch_nums": [1, 2]})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"scales": (1, 2, 2, 8)}, r"^scales: must be strictly increasing \(got \(1, 2, 2, 8\)\)$"),
        ({"scales": (1, 2, 4)}, r"^scales: must end at the latent grid size image_size / 4 = 8"),
        ({"image_size": 30}, r"^image_size: must be a multiple of the downsample factor 4 \(got 30\)$"),
        ({"codebook_size": 1}, r"^codebook_size: must be >= 2 \(got 1\)$"),
        ({"base_channels": 12}, r"^base_channels: every level width .* norm_groups 8"),
        ({"quant_resi": 1.5}, r"^quant_resi: must be in \[0, 1\]"),
        ({"channel_multipliers": ()}, r"^channel_multipliers: must be a non-empty"),
        ({"embed_dim": 0}, r"^embed_dim: must be >= 1"),
        ({"dropout": 1.0}, r"^dropout: must be in \[0, 1\)"),
    ],
)
def test_invalid_fields_fail_with_one_line_naming_the_field(changes, message):
    with pytest.raises(ValueError, match=message) as error:
        TOKENIZER_PRESETS["tiny"].replace(**changes)
    assert "\n" not in str(error.value)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        TOKENIZER_PRESETS["tiny"].codebook_size = 3  # type: ignore[misc]
