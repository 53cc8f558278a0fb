"""The seed's functional API: build, next_scale_prediction, total_tokens, recommended_defaults."""

from __future__ import annotations

import pytest
import torch
from var_helpers import random_token_maps, tiny_pair

from var_model import build, next_scale_prediction, recommended_defaults, total_tokens


def test_total_tokens():
    assert total_tokens() == 341
    assert total_tokens([1, 2, 4, 8, 16]) == 341
    assert total_tokens((1, 2, 3, 4, 5, 6, 8, 10, 13, 16)) == 680
    assert total_tokens((1, 2, 3, 4, 6, 9, 13, 18, 24, 32)) == 2240


def test_recommended_defaults_are_the_seeds():
    defaults = recommended_defaults()
    assert defaults == {"hidden_size": 512, "num_layers": 12, "num_heads": 8, "mlp_ratio": 4.0,
                        "scales": [1, 2, 4, 8, 16], "codebook_size": 1024}
    defaults["scales"].append(32)
    assert recommended_defaults()["scales"] == [1, 2, 4, 8, 16]  # a fresh copy each call


def test_build_uses_the_seed_defaults():
    with torch.device("meta"):
        model = build()
    config = model.config
    assert (config.hidden_size, config.num_layers, config.num_heads, config.mlp_ratio) == (512, 12, 8, 4.0)
    assert config.scales == (1, 2, 4, 8, 16) and config.codebook_size == 1024
    assert config.dropout == 0.1 and config.num_classes == 1000 and config.embed_dim == 256
    assert model.pos_1LC.shape == (1, 341, 512)
    with torch.device("meta"):
        custom = build(hidden_size=64, num_layers=2, num_heads=4, scales=[1, 2], codebook_size=16, drop_path=0.05)
    assert custom.config.drop_path == 0.05 and custom.head.out_features == 16
    with pytest.raises(ValueError, match="num_heads"):
        build(hidden_size=64, num_heads=5)


def test_next_scale_prediction_matches_teacher_forcing():
    var, tokenizer = tiny_pair((1, 2, 3, 4))
    token_maps = random_token_maps(var.config, batch=2)
    labels = torch.tensor([3, 4])
    with torch.no_grad():
        full = var(labels, tokenizer.teacher_forcing_input(token_maps))
        for k, side in enumerate(var.config.scales):
            logits = next_scale_prediction(var, None, token_maps[:k], k, labels, tokenizer=tokenizer)
            assert logits.shape == (2, side * side, var.config.codebook_size)
            begin, end = var.scale_bounds[k]
            assert torch.allclose(logits, full[:, begin:end], atol=1e-5)


def test_next_scale_prediction_with_a_state_dict():
    var, tokenizer = tiny_pair((1, 2, 4))
    token_maps = random_token_maps(var.config, batch=2)
    labels = torch.tensor([0, 9])
    with torch.no_grad():
        own = next_scale_prediction(var, None, token_maps, 2, labels, tokenizer=tokenizer)
        params = {name: tensor.clone() for name, tensor in var.state_dict().items()}
        functional = next_scale_prediction(var, params, token_maps, 2, labels, tokenizer=tokenizer)
        assert torch.equal(own, functional)
        params["head.bias"] = params["head.bias"] + 1.5
        shifted = next_scale_prediction(var, params, token_maps, 2, labels, tokenizer=tokenizer)
        assert torch.allclose(shifted, own + 1.5, atol=1e-5)
        # Only some entries: the rest come from the module; the module itself is untouched.
        partial = next_scale_prediction(var, {"head.bias": params["head.bias"]}, token_maps, 2, labels,
                                        tokenizer=tokenizer)
        assert torch.allclose(partial, shifted, atol=1e-6)
        assert torch.equal(next_scale_prediction(var, None, token_maps, 2, labels, tokenizer=tokenizer), own)


def test_next_scale_prediction_gradients_flow_through_params():
    var, tokenizer = tiny_pair((1, 2, 4))
    token_maps = random_token_maps(var.config, batch=2)
    params = {name: p.detach().clone().requires_grad_(True) for name, p in var.named_parameters()}
    logits = next_scale_prediction(var, params, token_maps, 1, torch.tensor([1, 2]), tokenizer=tokenizer)
    logits.sum().backward()
    assert params["head.weight"].grad is not None and params["word_embed.weight"].grad.abs().sum() > 0
    assert all(p.grad is None for p in var.parameters())


def test_next_scale_prediction_argument_errors():
    var, tokenizer = tiny_pair((1, 2, 4))
    labels = torch.tensor([0])
    assert next_scale_prediction(var, None, [], 0, labels).shape == (1, 1, 64)  # scale 0 needs no tokenizer
    tokens = random_token_maps(var.config, batch=1)
    with pytest.raises(ValueError, match="tokenizer"):
        next_scale_prediction(var, None, tokens, 1, labels)
    with pytest.raises(ValueError, match="scale_idx"):
        next_scale_prediction(var, None, tokens, 3, labels, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="current_tokens"):
        next_scale_prediction(var, None, tokens[:1], 2, labels, tokenizer=tokenizer)
