"""The inference fast paths compute what the plain code computes (within float rounding).

Each fast path is checked against the plain reference computation on tiny random weights:
the decoder's channels_last / folded-upsample path against its autograd forward, the top-k-then-
top-p filter against the official full-sort filter, the preallocated KV cache and memoised AdaLN
against a concatenating, recomputing cache, and whole generations (tokens equal, images within
1e-5) with every fast path on against every fast path off.
"""

from __future__ import annotations

import pytest
import torch

from var_model import VAR, VQVAE, KVCache, SamplingSettings, TokenizerConfig, generate, sampling
from var_model.autoencoder import Upsample
from var_model.generation import sample_token_maps
from var_helpers import randomize_, tiny_pair


def tokenizer_with_attention(scales=(1, 2, 4), seed: int = 0) -> VQVAE:
    """Decoder with attention, a width change (1x1 shortcut) and two upsamples."""
    torch.manual_seed(seed)
    config = TokenizerConfig(image_size=scales[-1] * 4, in_channels=3, scales=scales, codebook_size=64, embed_dim=8,
                             base_channels=16, channel_multipliers=(1, 2, 2), num_res_blocks=1, use_attention=True,
                             norm_groups=8)
    tokenizer = randomize_(VQVAE(config), seed=seed, std=0.2).eval()
    return tokenizer


def plain_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The official sample_with_top_k_top_p_ filter, not in place: top-k mask, full ascending sort."""
    if top_k > 0:
        kth_best = logits.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth_best, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_index = logits.sort(dim=-1, descending=False)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        logits = logits.masked_fill(remove_sorted.scatter(-1, sorted_index, remove_sorted), -torch.inf)
    return logits


class PlainCache(KVCache):
    """The reference cache: concatenates at every step and recomputes every memoised value."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(num_layers)

    def memo(self, key, argument, compute):
        return compute()


def plain_paths(monkeypatch: pytest.MonkeyPatch, tokenizer: VQVAE) -> None:
    monkeypatch.setattr(sampling, "_filter_top_k_then_top_p", lambda *args: None)
    monkeypatch.setattr(VAR, "new_cache", lambda self: PlainCache(self.config.num_layers))
    tokenizer.decoder.fast_inference = False


@pytest.mark.parametrize("batch", [1, 3])
def test_decoder_inference_path_matches_forward(batch):
    tokenizer = tokenizer_with_attention()
    latent = torch.randn(batch, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    plain = tokenizer.decoder(tokenizer.post_quant_conv(latent))  # grad enabled: the plain forward
    with torch.no_grad():
        fast = tokenizer.decoder(tokenizer.post_quant_conv(latent))
        tokenizer.prepare_for_inference()
        prepared = tokenizer.decoder(tokenizer.post_quant_conv(latent))
    assert fast.shape == plain.shape and fast.is_contiguous()
    torch.testing.assert_close(fast, plain.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prepared, plain.detach(), rtol=1e-5, atol=1e-5)


def test_folded_upsample_matches_upsample_then_conv_and_follows_weight_changes():
    torch.manual_seed(0)
    upsample = Upsample(6)
    x = torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(upsample.inference_forward(x), upsample(x), rtol=1e-5, atol=1e-5)
        upsample.conv.weight.mul_(-2.0)  # in place: the folded weights must be rebuilt
        torch.testing.assert_close(upsample.inference_forward(x), upsample(x), rtol=1e-5, atol=1e-5)
        upsample.load_state_dict({"conv.weight": torch.randn(6, 6, 3, 3), "conv.bias": torch.randn(6)})
        torch.testing.assert_close(upsample.inference_forward(x), upsample(x), rtol=1e-5, atol=1e-5)


def test_training_keeps_the_plain_decoder_and_its_gradients():
    tokenizer = tokenizer_with_attention().train()
    latent = torch.randn(2, 8, 4, 4, requires_grad=True)
    tokenizer.decoder(latent).square().mean().backward()
    assert latent.grad is not None and all(p.grad is not None for p in tokenizer.decoder.parameters())


@pytest.mark.parametrize("top_k,top_p", [(5, 0.9), (30, 0.5), (63, 0.99), (1, 0.9), (10, 1e-6)])
def test_top_k_then_top_p_matches_the_official_filter(top_k, top_p):
    logits = torch.randn(3, 17, 64, generator=torch.Generator().manual_seed(top_k)) * 3
    fast = sampling.filter_top_k_top_p(logits, top_k, top_p)
    reference = plain_filter(logits, top_k, top_p)
    assert torch.equal(fast == -torch.inf, reference == -torch.inf)
    kept = reference > -torch.inf
    assert torch.equal(fast[kept], reference[kept])


def test_ties_at_the_kth_logit_fall_back_to_the_official_filter():
    logits = torch.tensor([[[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]]])
    fast = sampling.filter_top_k_top_p(logits, 2, 0.99)  # top-k 2 keeps all three tied 2.0s (official)
    assert torch.equal(fast, plain_filter(logits, 2, 0.99))
    assert int((fast > -torch.inf).sum()) == 4


def test_preallocated_cache_and_memoised_adaln_match_the_plain_cache():
    var, tokenizer = tiny_pair(scales=(1, 2, 3))
    condition = var.class_condition(torch.tensor([1, 2, var.config.num_classes]))
    fast_cache, plain_cache = var.new_cache(), PlainCache(var.config.num_layers)
    assert fast_cache.capacity == var.num_tokens
    tokens = var.first_scale_input(condition)
    with torch.no_grad():
        for scale_index in range(len(var.config.scales)):
            fast = var.forward_cached(tokens, condition, fast_cache)
            plain = var.forward_cached(tokens, condition, plain_cache)
            torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-6)
            if scale_index + 1 < len(var.config.scales):
                begin, end = var.scale_bounds[scale_index + 1]
                tokens = torch.randn(3, end - begin, var.config.hidden_size)
    assert fast_cache.length == plain_cache.length == var.num_tokens


def test_cache_memo_recomputes_for_another_condition():
    cache = KVCache(1)
    a, b = torch.zeros(1), torch.ones(1)
    assert cache.memo("k", a, lambda: 1) == 1
    assert cache.memo("k", a, lambda: 2) == 1
    assert cache.memo("k", b, lambda: 3) == 3


@pytest.mark.parametrize("cfg,top_k,top_p,seeds", [(1.5, 20, 0.9, 0), (4.0, 0, 0.8, torch.tensor([3, 4, 5])),
                                                    (0.0, 10, 0.0, 7)])
def test_generation_with_fast_paths_equals_the_plain_computation(monkeypatch, cfg, top_k, top_p, seeds):
    var, _ = tiny_pair(scales=(1, 2, 4))
    tokenizer = tokenizer_with_attention(scales=(1, 2, 4))
    with torch.no_grad():
        tokenizer.quantize.embedding.weight.normal_(generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, var.config.num_classes])
    fast = generate(var, tokenizer, labels, cfg=cfg, top_k=top_k, top_p=top_p, seeds=seeds)
    plain_paths(monkeypatch, tokenizer)
    plain = generate(var, tokenizer, labels, cfg=cfg, top_k=top_k, top_p=top_p, seeds=seeds)
    for fast_map, plain_map in zip(fast.token_maps, plain.token_maps):
        assert torch.equal(fast_map, plain_map)
    torch.testing.assert_close(fast.images, plain.images, rtol=1e-5, atol=1e-5)


def test_cfg_zero_skips_the_null_class_half_with_the_same_tokens():
    var, tokenizer = tiny_pair(scales=(1, 2, 4))
    labels = torch.tensor([1, 2])
    unguided, _ = sample_token_maps(var, tokenizer, labels, SamplingSettings(0.0, 10, 0.9), seeds=5)
    # A guidance weight too small to change a float32 logit still runs the doubled batch.
    doubled, _ = sample_token_maps(var, tokenizer, labels, SamplingSettings(1e-30, 10, 0.9), seeds=5)
    for a, b in zip(unguided, doubled):
        assert torch.equal(a, b)
