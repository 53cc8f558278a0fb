"""VARConfig validation, depth parameterisation and presets."""

from __future__ import annotations

import pytest

from var_model import TOKENIZER_PRESETS, VAR_PRESETS, VARConfig


@pytest.mark.parametrize(
    "fields,field",
    [
        (dict(hidden_size=100, num_heads=3), "num_heads"),
        (dict(scales=(1, 2, 2, 4)), "scales"),
        (dict(scales=(2, 1)), "scales"),
        (dict(scales=()), "scales"),
        (dict(scales=(0, 1)), "scales"),
        (dict(codebook_size=1), "codebook_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(drop_path=-0.1), "drop_path"),
        (dict(cond_drop_rate=1.5), "cond_drop_rate"),
        (dict(num_layers=0), "num_layers"),
        (dict(mlp_ratio=0.0), "mlp_ratio"),
        (dict(embed_dim=0), "embed_dim"),
    ],
)
def test_invalid_fields_fail_with_one_line_naming_the_field(fields, field):
    with pytest.raises(ValueError) as error:
        VARConfig(**fields)
    message = str(error.value)
    assert message.startswith(f"{field}: ") and "\n" not in message and "(got " in message


def test_round_trip_and_unknown_fields():
    config = VARConfig.from_depth(16)
    data = config.to_dict()
    assert data["scales"] == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    assert VARConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="unknown"):
        VARConfig.from_dict({**data, "depth": 16})


@pytest.mark.parametrize("depth,gamma", [(16, 1e-3), (20, 1e-3), (24, 1e-4), (30, 1e-5)])
def test_from_depth_is_the_official_parameterisation(depth, gamma):
    config = VARConfig.from_depth(depth)
    assert config.hidden_size == 64 * depth and config.num_heads == depth and config.head_dim == 64
    assert config.mlp_ratio == 4.0 and config.drop_path == pytest.approx(0.1 * depth / 24)
    assert config.init_adaln == 0.5 and config.init_adaln_gamma == gamma
    assert config.scales == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) and config.total_tokens == 680
    assert (config.codebook_size, config.embed_dim, config.num_classes) == (4096, 32, 1000)
    assert config.attn_l2_norm and not config.shared_adaln and config.cond_drop_rate == 0.1
    assert VAR_PRESETS[f"d{depth}"] == config
    assert VARConfig.from_depth(depth, num_classes=10).num_classes == 10


@pytest.mark.parametrize("name", ["fashion-32", "tiny"])
def test_small_presets_pair_with_the_tokenizer_presets(name):
    var_config, tokenizer_config = VAR_PRESETS[name], TOKENIZER_PRESETS[name]
    assert var_config.scales == tokenizer_config.scales
    assert var_config.codebook_size == tokenizer_config.codebook_size
    assert var_config.embed_dim == tokenizer_config.embed_dim
    assert var_config.num_classes == 10


def test_official_presets_pair_with_the_official_tokenizer():
    for var_name, tokenizer_name in (("d16", "official-256"), ("d30", "official-256"), ("d36-s", "official-512")):
        var_config, tokenizer_config = VAR_PRESETS[var_name], TOKENIZER_PRESETS[tokenizer_name]
        assert (var_config.scales, var_config.codebook_size, var_config.embed_dim) == (
            tokenizer_config.scales, tokenizer_config.codebook_size, tokenizer_config.embed_dim)
