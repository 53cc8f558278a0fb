"""Scale-by-scale generation: seeding, guidance, top-k / top-p sampling."""

from __future__ import annotations

import pytest
import torch
from var_helpers import tiny_pair

from var_model import SamplingSettings, generate, next_scale_prediction
from var_model.generation import sample_token_maps
from var_model.sampling import filter_top_k_top_p, sample_tokens

SCALES = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(SCALES, seed=3)


def test_generate_shapes_and_range(pair):
    var, tokenizer = pair
    out = generate(var, tokenizer, torch.tensor([0, 4, 9]), seeds=torch.tensor([1, 2, 3]))
    assert out.images.shape == (3, 1, 16, 16)
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert [tuple(t.shape) for t in out.token_maps] == [(3, s, s) for s in SCALES]
    assert all(t.dtype == torch.int64 and t.min() >= 0 and t.max() < 64 for t in out.token_maps)
    # The images are the tokenizer's decoding of the returned tokens.
    assert torch.allclose(out.images, tokenizer.decode_tokens(out.token_maps).add(1).mul(0.5), atol=1e-5)


def test_seeded_generation_is_deterministic(pair):
    var, tokenizer = pair
    labels = torch.tensor([1, 1, 5, 8])
    seeds = torch.tensor([10, 11, 12, 13])
    first = generate(var, tokenizer, labels, seeds=seeds)
    second = generate(var, tokenizer, labels, seeds=seeds)
    assert all(torch.equal(a, b) for a, b in zip(first.token_maps, second.token_maps))
    assert torch.equal(first.images, second.images)
    other = generate(var, tokenizer, labels, seeds=seeds + 100)
    assert not all(torch.equal(a, b) for a, b in zip(first.token_maps, other.token_maps))
    # Same label, different seeds within one batch: different samples.
    assert not torch.equal(first.token_maps[-1][0], first.token_maps[-1][1])
    # An int seed (one generator for the batch, like the official g_seed) is deterministic too.
    a = generate(var, tokenizer, labels, seeds=7).token_maps
    b = generate(var, tokenizer, labels, seeds=7).token_maps
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_sample_depends_only_on_its_own_label_and_seed(pair):
    var, tokenizer = pair
    forward = sample_token_maps(var, tokenizer, torch.tensor([2, 6, 9]), seeds=torch.tensor([5, 6, 7]))[0]
    permuted = sample_token_maps(var, tokenizer, torch.tensor([9, 2, 6]), seeds=torch.tensor([7, 5, 6]))[0]
    order = torch.tensor([1, 2, 0])
    assert all(torch.equal(a, b[order]) for a, b in zip(forward, permuted))


def test_cfg_zero_equals_unguided_conditional_sampling(pair):
    """Reference: no doubled batch, no KV cache: the teacher-forced prefix, one scale at a time."""
    var, tokenizer = pair
    labels = torch.tensor([0, 3, 7])
    seeds = torch.tensor([21, 22, 23])
    guided_path = sample_token_maps(var, tokenizer, labels, SamplingSettings(0.0, 20, 0.9), seeds=seeds)[0]

    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    reference: list[torch.Tensor] = []
    with torch.no_grad():
        for k, side in enumerate(SCALES):
            logits = next_scale_prediction(var, None, reference, k, labels, tokenizer=tokenizer)
            reference.append(sample_tokens(logits, top_k=20, top_p=0.9, generator=generators).view(3, side, side))
    assert all(torch.equal(a, b) for a, b in zip(guided_path, reference))
    # ... and guidance does change the samples of this (random-weight) model.
    guided = sample_token_maps(var, tokenizer, labels, SamplingSettings(4.0, 20, 0.9), seeds=seeds)[0]
    assert torch.equal(guided[0], guided_path[0])  # t = 0 at the first scale
    assert not all(torch.equal(a, b) for a, b in zip(guided[1:], guided_path[1:]))


def test_greedy_sampling_follows_guided_logits(pair):
    """top_k=1 picks the argmax of (1 + t) * cond - t * uncond with t = cfg * k / (K - 1)."""
    var, tokenizer = pair
    labels = torch.tensor([4, 8])
    cfg = 2.0
    tokens = sample_token_maps(var, tokenizer, labels, SamplingSettings(cfg, 1, 0.0), seeds=0)[0]
    null = torch.full_like(labels, var.config.num_classes)
    with torch.no_grad():
        for k in range(len(SCALES)):
            conditional = next_scale_prediction(var, None, tokens, k, labels, tokenizer=tokenizer)
            unconditional = next_scale_prediction(var, None, tokens, k, null, tokenizer=tokenizer)
            t = cfg * k / (len(SCALES) - 1)
            expected = ((1 + t) * conditional - t * unconditional).argmax(-1)
            assert torch.equal(tokens[k].flatten(1), expected)


def test_top_k_and_top_p_filters():
    probabilities = torch.tensor([[[0.05, 0.5, 0.15, 0.3]]])
    logits = probabilities.log()
    kept_k = torch.isfinite(filter_top_k_top_p(logits, top_k=2))[0, 0].tolist()
    assert kept_k == [False, True, False, True]
    # Nucleus: drop ascending tokens whose cumulative mass stays <= 1 - p = 0.25 (0.05, 0.15).
    kept_p = torch.isfinite(filter_top_k_top_p(logits, top_p=0.75))[0, 0].tolist()
    assert kept_p == [False, True, False, True]
    # The most likely token always survives, even for a tiny p; top_k above V is capped.
    assert torch.isfinite(filter_top_k_top_p(logits, top_p=1e-6))[0, 0].tolist() == [False, True, False, False]
    assert torch.isfinite(filter_top_k_top_p(logits, top_k=900)).all()
    assert torch.equal(filter_top_k_top_p(logits), logits)


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log().expand(1, 4000, 4)
    draws = sample_tokens(logits, top_k=3, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws.flatten(), minlength=4).float() / draws.numel()
    assert counts[0] == 0
    assert torch.allclose(counts[1:], torch.tensor([0.5, 0.15, 0.3]) / 0.95, atol=0.03)


def test_incompatible_tokenizer_and_bad_inputs_fail_clearly(pair):
    var, _ = pair
    _, other_tokenizer = tiny_pair((1, 2, 4))
    with pytest.raises(ValueError, match="scales"):
        generate(var, other_tokenizer, torch.tensor([0]))
    _, tokenizer = pair
    with pytest.raises(ValueError, match="seeds"):
        generate(var, tokenizer, torch.tensor([0, 1]), seeds=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="labels"):
        generate(var, tokenizer, torch.tensor([11]))
