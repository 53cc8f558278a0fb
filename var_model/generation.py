"""Class-conditional generation, scale by scale (official VAR.autoregressive_infer_cfg).

For each scale k the transformer sees one new block of s_k^2 tokens and its KV cache of all coarser
scales; the batch is doubled as [conditional; null class] and the logits are guided with the official
linear ramp t = cfg * k / (K - 1): logits = (1 + t) * conditional - t * unconditional (no guidance at
1x1, full cfg at the last scale). Tokens are drawn with top-k then top-p; their codes are added to the
accumulated latent through the tokenizer, which also gives the next scale's input.

`SamplingSettings.unguided_last_scales` (off by default) drops the null-class half for the last scales:
from there on the batch is conditional only, and the cache keeps only the conditional sequences.
`pruned_last_scales` (off by default) recomputes only the changing tokens there (token_pruning).

Modules are used in whatever mode they are in: call `.eval()` first (dropout / drop path).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from var_model.sampling import sample_tokens
from var_model.sampling_settings import OFFICIAL_FID_SAMPLING, SamplingSettings
from var_model.token_pruning import changing_tokens, nearest_upsample
from var_model.transformer import VAR
from var_model.vqvae import VQVAE


class GenerationOutput(NamedTuple):
    images: torch.Tensor  # [B, C, H, W] float in [0, 1]
    token_maps: list[torch.Tensor]  # one int64 [B, s, s] per scale


def check_compatible(var: VAR, tokenizer: VQVAE) -> None:
    """The transformer must have been built for this tokenizer's scales, codebook and latent width."""
    for field in ("scales", "codebook_size", "embed_dim"):
        ours, theirs = getattr(var.config, field), getattr(tokenizer.config, field)
        if ours != theirs:
            raise ValueError(f"{field}: transformer has {ours!r} but the tokenizer has {theirs!r}")


def make_generators(
    seeds: int | torch.Tensor | None, batch: int, device: torch.device
) -> torch.Generator | list[torch.Generator] | None:
    """None -> global RNG; int -> one generator for the batch; [B] tensor -> one generator per sample."""
    if seeds is None:
        return None
    if isinstance(seeds, int):
        return torch.Generator(device=device).manual_seed(seeds)
    seeds = torch.as_tensor(seeds)
    if seeds.shape != (batch,):
        raise ValueError(f"seeds: expected an int or a tensor of shape [{batch}] (got {tuple(seeds.shape)})")
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds.tolist()]


def label_batch(labels: torch.Tensor | int | None, num_classes: int, batch_size: int | None = None,
                seeds: int | torch.Tensor | None = None) -> torch.Tensor:
    """Labels as an int64 [B] tensor, as the official sampler takes them: a tensor [B] as it is; a
    single int for the whole batch (negative: unconditional); None: unconditional (the null class).

    For an int or None, B is `batch_size`, else the length of a `seeds` tensor, else 1.
    """
    if isinstance(labels, torch.Tensor):
        if batch_size is not None and labels.shape[:1] != (batch_size,):
            raise ValueError(f"batch_size: {batch_size} but labels has shape {tuple(labels.shape)}")
        return labels
    if labels is not None and (isinstance(labels, bool) or not isinstance(labels, int)):
        raise ValueError(f"labels: expected an integer tensor [B], an int or None (got {type(labels).__name__})")
    if batch_size is None:
        batch_size = int(torch.as_tensor(seeds).numel()) if isinstance(seeds, torch.Tensor) else 1
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1 (got {batch_size})")
    label = num_classes if labels is None or labels < 0 else labels
    return torch.full((batch_size,), label, dtype=torch.long)


def _checked_labels(var: VAR, labels: torch.Tensor) -> torch.Tensor:
    """int64 [B] class indices, negative labels mapped to the null class (official)."""
    num_classes = var.config.num_classes
    if labels.ndim != 1 or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels: expected an integer tensor [B] (got {labels.dtype} {tuple(labels.shape)})")
    if bool((labels > num_classes).any()):
        raise ValueError(f"labels: must be < {num_classes} (or {num_classes} / negative for unconditional)")
    return torch.where(labels < 0, num_classes, labels).long()  # negative: unconditional (official)


def _guidance_labels(var: VAR, labels: torch.Tensor) -> torch.Tensor:
    """[conditional; null class]: the doubled batch of classifier-free guidance, [2B]."""
    labels = _checked_labels(var, labels)
    return torch.cat((labels, torch.full_like(labels, var.config.num_classes)))


@torch.no_grad()
def sample_token_maps(
    var: VAR,
    tokenizer: VQVAE,
    labels: torch.Tensor | int | None,
    sampling: SamplingSettings = OFFICIAL_FID_SAMPLING,
    *,
    seeds: int | torch.Tensor | None = None,
    batch_size: int | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sample the token pyramid; returns (token_maps, accumulated latent [B, embed_dim, h, w]).
    Labels, seeds and batch size as for `generate`."""
    cfg, top_k, top_p = sampling.cfg, sampling.top_k, sampling.top_p
    check_compatible(var, tokenizer)
    quantizer = tokenizer.quantize
    scales = var.config.scales
    labels = label_batch(labels, var.config.num_classes, batch_size, seeds)
    batch = labels.shape[0]
    device = var.pos_1LC.device
    generator = make_generators(seeds, batch, device)

    # Without guidance (cfg 0) the null-class half would only be computed to be weighted by 0: the
    # batch is not doubled (the conditional rows do not depend on the others).
    guided_scales = 0 if cfg == 0 else max(len(scales) - sampling.unguided_last_scales, 0)
    guided = guided_scales > 0
    # Pruning needs a previous scale of more than one token to refill from.
    first_pruned = max(len(scales) - sampling.pruned_last_scales, 2)
    latent_input = previous_input = previous_logits = None
    labels = labels.to(device)
    condition = var.class_condition(_guidance_labels(var, labels) if guided else _checked_labels(var, labels))
    cache = var.new_cache()
    tokens_in = var.first_scale_input(condition)
    latent_side = quantizer.latent_size
    accumulated = torch.zeros(batch, var.config.embed_dim, latent_side, latent_side, device=device)
    token_maps = []
    for scale_index, side in enumerate(scales):
        if guided and scale_index == guided_scales:  # the unguided last scales: conditional half only
            guided = False
            condition, tokens_in = condition[:batch], tokens_in[:batch]
            cache.keep_rows(batch)
        kept = None
        if scale_index >= first_pruned:
            kept = changing_tokens(latent_input, previous_input, sampling.prune_keep)
            rows = kept.repeat(2, 1) if guided else kept
            tokens_in = tokens_in.gather(1, rows.unsqueeze(-1).expand(-1, -1, tokens_in.shape[-1]))
        logits = var.forward_cached(tokens_in, condition, cache)
        if guided:
            guidance = cfg * scale_index / max(len(scales) - 1, 1)
            logits = (1 + guidance) * logits[:batch] - guidance * logits[batch:]
        if kept is not None:  # the others from the previous scale's logits at their parent position
            refilled = nearest_upsample(previous_logits, scales[scale_index - 1], side)
            logits = refilled.scatter(1, kept.unsqueeze(-1).expand(-1, -1, logits.shape[-1]), logits)
        previous_logits = logits
        tokens = sample_tokens(logits, top_k=top_k, top_p=top_p, generator=generator).view(batch, side, side)
        token_maps.append(tokens)
        codes = quantizer.embed_tokens(tokens, scale_index).float()
        accumulated, next_input = quantizer.next_autoregressive_input(scale_index, accumulated, codes)
        if next_input is not None:
            previous_input, latent_input = latent_input, next_input
            tokens_in = var.scale_input(next_input, scale_index + 1)
            if guided:
                tokens_in = tokens_in.repeat(2, 1, 1)
    return token_maps, accumulated


@torch.no_grad()
def generate(
    var: VAR,
    tokenizer: VQVAE,
    labels: torch.Tensor | int | None,
    *,
    cfg: float = OFFICIAL_FID_SAMPLING.cfg,
    top_k: int = OFFICIAL_FID_SAMPLING.top_k,
    top_p: float = OFFICIAL_FID_SAMPLING.top_p,
    unguided_last_scales: int = OFFICIAL_FID_SAMPLING.unguided_last_scales,
    pruned_last_scales: int = OFFICIAL_FID_SAMPLING.pruned_last_scales,
    prune_keep: float = OFFICIAL_FID_SAMPLING.prune_keep,
    seeds: int | torch.Tensor | None = None,
    batch_size: int | None = None,
) -> GenerationOutput:
    """Generate one image per label, with the official sampler's arguments (defaults: its FID settings).

    labels: int64 [B] in [0, num_classes) (num_classes or negative: unconditional), or as the official
    sampler a single int for the whole batch or None for unconditional; then the batch is `batch_size`
    (default: the length of a seeds tensor, else 1). seeds: None (global
    RNG), an int (one generator for the batch, like the official g_seed), or an int64 [B] tensor: one
    generator per sample, so a sample depends only on its own (label, seed). unguided_last_scales,
    pruned_last_scales, prune_keep: see `SamplingSettings` (the defaults are the official sampler).
    """
    sampling = SamplingSettings(cfg, top_k, top_p, unguided_last_scales, pruned_last_scales, prune_keep)
    token_maps, accumulated = sample_token_maps(var, tokenizer, labels, sampling, seeds=seeds, batch_size=batch_size)
    images = tokenizer.decode_latent(accumulated).add(1).mul(0.5)
    return GenerationOutput(images, token_maps)
