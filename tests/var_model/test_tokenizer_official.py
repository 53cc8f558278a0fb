"""Loading tokenizer state dicts in the official VAR key layout."""

from __future__ import annotations

import pytest
import torch

from var_model import TOKENIZER_PRESETS, VQVAE, TokenizerConfig, load_official_tokenizer
from var_model.official_tokenizer import CheckpointMismatchError, infer_tokenizer_config

# Official layout in miniature: 2 levels (factor 2), the official GroupNorm(32), shared codebook,
# 4 partially shared Phis, the official 10-scale schedule on a 16x16 grid.
SMALL = TokenizerConfig(image_size=32, in_channels=3, scales=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), codebook_size=64,
                        embed_dim=8, base_channels=32, channel_multipliers=(1, 2), num_res_blocks=2)


def test_official_256_layout_infers_the_official_config():
    with torch.device("meta"):
        state = VQVAE(TOKENIZER_PRESETS["official-256"]).state_dict()
    assert infer_tokenizer_config(state) == TOKENIZER_PRESETS["official-256"]
    assert infer_tokenizer_config(state, image_size=512) == TOKENIZER_PRESETS["official-512"]
    with pytest.raises(ValueError, match="^scales: no official schedule for a 8x8 latent grid"):
        infer_tokenizer_config(state, image_size=128)
    assert infer_tokenizer_config(state, image_size=128, scales=(1, 2, 4, 8)).scales == (1, 2, 4, 8)


def test_a_state_dict_file_loads_strictly_and_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    source = VQVAE(SMALL).eval()
    with torch.no_grad():
        source.quantize.embedding.weight.normal_(0, 0.5)
        source.quantize.ema_vocab_hit_SV.uniform_()
    path = tmp_path / "vae.pth"
    torch.save(source.state_dict(), path)

    loaded = load_official_tokenizer(path, image_size=32)  # the official schedule for a 16x16 grid
    assert loaded.config == SMALL and not loaded.training
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = source.encode_tokens(images)
    assert all(torch.equal(a, b) for a, b in zip(tokens, loaded.encode_tokens(images)))
    torch.testing.assert_close(loaded.decode_tokens(tokens), source.decode_tokens(tokens))


@pytest.mark.parametrize(("changes", "phi_key"), [
    ({"share_quant_resi": 1}, "quantize.quant_resi.qresi.weight"),
    ({"share_quant_resi": 0}, "quantize.quant_resi.9.weight"),
    ({"share_quant_resi": 3}, "quantize.quant_resi.qresi_ls.2.weight"),
    ({"quant_resi": 0.0}, None),
    ({"codebook_per_scale": True, "use_attention": False, "in_channels": 1}, "quantize.quant_resi.qresi_ls.3.weight"),
])
def test_other_layouts_are_inferred_from_their_keys(changes, phi_key):
    config = SMALL.replace(**changes)
    with torch.device("meta"):
        state = VQVAE(config).state_dict()
    assert phi_key is None or phi_key in state
    assert infer_tokenizer_config(state, image_size=32) == config


def _small_official_state():
    return VQVAE(SMALL).state_dict()


def test_a_missing_key_is_named_in_the_error():
    state = _small_official_state()
    del state["decoder.up.1.upsample.conv.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: decoder\.up\.1\.upsample\.conv\.bias"):
        load_official_tokenizer(state, image_size=32)


def test_an_extra_key_is_named_in_the_error():
    state = _small_official_state()
    state["quantize.extra_codebook.weight"] = torch.zeros(4, 8)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: quantize\.extra_codebook\.weight"):
        load_official_tokenizer(state, image_size=32)


def test_a_wrong_shape_is_named_in_the_error():
    state = _small_official_state()
    state["encoder.mid.attn_1.qkv.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatches: encoder\.mid\.attn_1\.qkv\.bias"):
        load_official_tokenizer(state, image_size=32)


def test_a_foreign_state_dict_is_refused():
    with pytest.raises(CheckpointMismatchError, match="missing key 'encoder.conv_in.weight'"):
        load_official_tokenizer({"weight": torch.zeros(2)})


def test_a_code_usage_buffer_for_another_schedule_is_accepted_like_official():
    state = _small_official_state()
    state["quantize.ema_vocab_hit_SV"] = torch.ones(6, 64)  # recorded with 6 scales
    model = load_official_tokenizer(state, image_size=32)
    assert model.quantize.ema_vocab_hit_SV.shape == (10, 64)
