"""The sampler's training-free speed-ups, both off by default.

- unguided_last_scales: the last N scales are drawn from the conditional logits alone, with the
  null-class half of the batch and of the KV cache dropped. Checked against a reference that keeps
  the doubled batch to the end and weights the unconditional logits by 0 there.
- pruned_last_scales (FastVAR-style): only the changing tokens of the last N scales go through the
  transformer; the others take their parent's logits from the previous scale.
"""

from __future__ import annotations

import pytest
import torch
from var_helpers import tiny_pair

from pipeline.core.configuration import SamplingSection
from var_model import SamplingSettings, generate
from var_model.generation import make_generators, sample_token_maps
from var_model.sampling import sample_tokens
from var_model.token_pruning import changing_tokens, nearest_upsample


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


def test_nearest_upsample_is_interpolate_nearest_and_the_most_changed_tokens_are_kept():
    rows = torch.randn(2, 9, 5)
    grid = rows.transpose(1, 2).reshape(2, 5, 3, 3)
    expected = torch.nn.functional.interpolate(grid, size=(4, 4), mode="nearest").flatten(2).transpose(1, 2)
    assert torch.equal(nearest_upsample(rows, 3, 4), expected)
    previous = torch.zeros(1, 4, 2)
    current = torch.zeros(1, 9, 2)
    current[0, [7, 1, 4], 0] = torch.tensor([3.0, 2.0, 1.0])  # moved by 3, 2, 1; the rest not at all
    assert changing_tokens(current, previous, keep=0.25).tolist() == [[1, 4, 7]]  # ceil(2.25), ascending
    assert changing_tokens(current, previous, keep=0.2).tolist() == [[1, 7]]


def test_pruning_that_keeps_every_token_is_the_official_sampler():
    var, tokenizer = tiny_pair(scales=(1, 2, 4, 8))
    labels = torch.tensor([1, 2, 0])
    official = generate(var, tokenizer, labels, cfg=2.0, top_k=10, top_p=0.9, seeds=3)
    kept_all = generate(var, tokenizer, labels, cfg=2.0, top_k=10, top_p=0.9, seeds=3, pruned_last_scales=2,
                        prune_keep=1.0)
    assert all(torch.equal(a, b) for a, b in zip(kept_all.token_maps, official.token_maps))
    torch.testing.assert_close(kept_all.images, official.images)


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_pruned_tokens_take_their_parents_and_only_the_kept_ones_are_computed(cfg, monkeypatch):
    var, tokenizer = tiny_pair(scales=(1, 2, 4, 8))
    labels = torch.tensor([1, 2])
    computed = []
    forward = type(var).forward_cached
    monkeypatch.setattr(type(var), "forward_cached",
                        lambda self, tokens, *rest: computed.append(tokens.shape[:2]) or forward(self, tokens, *rest))
    # Greedy (top-k 1), so a refilled token is exactly its parent's: the argmax of the same logits.
    sampling = SamplingSettings(cfg=cfg, top_k=1, top_p=0.0, pruned_last_scales=2, prune_keep=0.25)
    token_maps, _ = sample_token_maps(var, tokenizer, labels, sampling, seeds=0)
    rows = 2 * len(labels) if cfg else len(labels)
    assert computed == [(rows, 1), (rows, 4), (rows, 4), (rows, 16)]  # ceil(0.25 * 16), ceil(0.25 * 64)
    for scale in (2, 3):
        side, parent_side = token_maps[scale].shape[-1], token_maps[scale - 1].shape[-1]
        parents = nearest_upsample(token_maps[scale - 1].reshape(2, -1, 1), parent_side, side).view(2, side, side)
        assert (token_maps[scale] != parents).sum(dim=(1, 2)).max() <= side * side // 4


def test_bad_shortcut_values_are_refused_in_the_settings_and_in_the_config():
    for field, value, message in (("unguided_last_scales", -1, "must be >= 0"),
                                  ("pruned_last_scales", -1, "must be >= 0"),
                                  ("prune_keep", 0.0, "must be in \\(0, 1\\]"), ("prune_keep", 1.5, "must be in")):
        with pytest.raises(ValueError, match=f"{field}: {message}"):
            SamplingSettings(**{field: value})
        with pytest.raises(ValueError, match=field):
            SamplingSection(**{field: value})
    assert SamplingSection().settings == SamplingSettings()  # off by default: the official sampler
    assert SamplingSection(unguided_last_scales=2, pruned_last_scales=1, prune_keep=0.4).settings == SamplingSettings(
        unguided_last_scales=2, pruned_last_scales=1, prune_keep=0.4)
