"""The unguided-last-scales option (off by default): the last N scales are drawn from the conditional
logits alone, with the null-class half of the batch and of the KV cache dropped. Checked against a
reference that keeps the doubled batch to the end and weights the unconditional logits by 0 there."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.configuration import SamplingSection
from var_model import SamplingSettings, generate
from var_model.generation import make_generators, sample_token_maps
from var_model.sampling import sample_tokens
from var_helpers import tiny_pair


@torch.no_grad()
def doubled_to_the_end(var, tokenizer, labels, sampling: SamplingSettings, seeds: int) -> list[torch.Tensor]:
    """The official loop with the guidance weight set to 0 at the last `unguided_last_scales` scales."""
    scales, batch, quantizer = var.config.scales, labels.shape[0], tokenizer.quantize
    generator = make_generators(seeds, batch, labels.device)
    condition = var.class_condition(torch.cat((labels, torch.full_like(labels, var.config.num_classes))))
    cache = var.new_cache()
    tokens_in = var.first_scale_input(condition)
    accumulated = torch.zeros(batch, var.config.embed_dim, quantizer.latent_size, quantizer.latent_size)
    token_maps = []
    for scale_index, side in enumerate(scales):
        logits = var.forward_cached(tokens_in, condition, cache)
        guided = scale_index < len(scales) - sampling.unguided_last_scales
        weight = sampling.cfg * scale_index / (len(scales) - 1) if guided else 0.0
        logits = (1 + weight) * logits[:batch] - weight * logits[batch:]
        tokens = sample_tokens(logits, top_k=sampling.top_k, top_p=sampling.top_p, generator=generator)
        token_maps.append(tokens.view(batch, side, side))
        codes = quantizer.embed_tokens(token_maps[-1], scale_index).float()
        accumulated, next_input = quantizer.next_autoregressive_input(scale_index, accumulated, codes)
        if next_input is not None:
            tokens_in = var.scale_input(next_input, scale_index + 1).repeat(2, 1, 1)
    return token_maps


@pytest.mark.parametrize("unguided", [1, 2])
def test_unguided_last_scales_equal_the_doubled_batch_weighted_by_zero_there(unguided):
    var, tokenizer = tiny_pair(scales=(1, 2, 4, 8))
    labels = torch.tensor([1, 2, 0])
    sampling = SamplingSettings(cfg=3.0, top_k=10, top_p=0.9, unguided_last_scales=unguided)
    fast, _ = sample_token_maps(var, tokenizer, labels, sampling, seeds=7)
    reference = doubled_to_the_end(var, tokenizer, labels, sampling, seeds=7)
    for fast_map, reference_map in zip(fast, reference):
        assert torch.equal(fast_map, reference_map)
    # The guided scales are those of the official sampler; the option changes what follows them.
    official, _ = sample_token_maps(var, tokenizer, labels, SamplingSettings(cfg=3.0, top_k=10, top_p=0.9), seeds=7)
    guided = len(fast) - unguided
    assert all(torch.equal(a, b) for a, b in zip(fast[:guided], official[:guided]))
    assert not all(torch.equal(a, b) for a, b in zip(fast[guided:], official[guided:]))


def test_every_scale_unguided_is_the_cfg_zero_sampler():
    var, tokenizer = tiny_pair(scales=(1, 2, 4))
    labels = torch.tensor([3, 4])
    skipped = generate(var, tokenizer, labels, cfg=2.0, top_k=10, top_p=0.9, unguided_last_scales=5, seeds=1)
    plain = generate(var, tokenizer, labels, cfg=0.0, top_k=10, top_p=0.9, seeds=1)
    assert all(torch.equal(a, b) for a, b in zip(skipped.token_maps, plain.token_maps))
    torch.testing.assert_close(skipped.images, plain.images)


def test_a_negative_count_is_refused_in_the_settings_and_in_the_config():
    with pytest.raises(ValueError, match="unguided_last_scales: must be >= 0"):
        SamplingSettings(unguided_last_scales=-1)
    assert SamplingSection().settings.unguided_last_scales == 0  # off by default: the official sampler
    assert SamplingSection(unguided_last_scales=2).settings.unguided_last_scales == 2
    with pytest.raises(ValueError, match="unguided_last_scales"):
        SamplingSection(unguided_last_scales=-1)
