"""Top-k / top-p token sampling (official helpers.sample_with_top_k_top_p_), with optional
per-sample random generators so a sample's draw depends only on its own seed."""

from __future__ import annotations

import torch


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Logits with everything outside the top-k, then outside the top-p nucleus, set to -inf.

    top_k <= 0 or top_p <= 0 switches that filter off (official). top_k is capped at the vocabulary
    size (the official code would fail on top_k > V, e.g. the default 900 with a 512-code tokenizer).
    The nucleus drops the tokens whose ascending cumulative probability stays <= 1 - top_p and always
    keeps the most likely one. Not in place.
    """
    vocab = logits.shape[-1]
    if 0 < top_k < vocab and top_p > 0:
        filtered = _filter_top_k_then_top_p(logits, top_k, top_p)
        if filtered is not None:
            return filtered
    if top_k > 0 and top_k < vocab:
        kth_best = logits.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth_best, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_index = logits.sort(dim=-1, descending=False)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_index, remove_sorted)
        logits = logits.masked_fill(remove, -torch.inf)
    return logits


def _filter_top_k_then_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor | None:
    """filter_top_k_top_p for 0 < top_k < V and top_p > 0, sorting only the k survivors of top-k.

    After top-k every other logit is -inf and has probability 0, so the nucleus is decided by the k
    best alone: their ascending cumulative softmax is the official one over all V (which adds exact
    zeros first), up to float rounding. None when the k-th best value is tied with a logit outside
    the k (top-k then keeps more than k; the caller takes the plain path).
    """
    best, best_index = logits.topk(top_k, dim=-1, largest=True, sorted=True)  # descending
    kth_best = best[..., -1:]
    if bool(((logits >= kth_best).sum(dim=-1) != top_k).any()):
        return None
    ascending = best.flip(-1)
    remove = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    remove[..., -1:] = False  # always keep the most likely
    kept = ascending.masked_fill(remove, -torch.inf).flip(-1)
    return torch.full_like(logits, -torch.inf).scatter_(-1, best_index, kept)


def sample_tokens(
    logits: torch.Tensor,
    *,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Draw one token per position from filtered logits [B, n, V] -> int64 [B, n].

    `generator`: None (global RNG), one generator for the whole batch (official g_seed), or a list of
    B generators, one per sample.
    """
    batch, tokens, vocab = logits.shape
    probabilities = filter_top_k_top_p(logits, top_k, top_p).softmax(dim=-1)
    if isinstance(generator, list):
        if len(generator) != batch:
            raise ValueError(f"generator: expected {batch} per-sample generators (got {len(generator)})")
        draws = [torch.multinomial(probabilities[i], 1, replacement=True, generator=g) for i, g in enumerate(generator)]
        return torch.stack(draws).view(batch, tokens)
    flat = probabilities.view(-1, vocab)
    return torch.multinomial(flat, 1, replacement=True, generator=generator).view(batch, tokens)
