"""Next-scale prediction loss (official trainer.py): cross-entropy over every token of the pyramid,
each of the L tokens weighted 1/L, averaged over the batch; no per-scale weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flatten_token_maps(token_maps: list[torch.Tensor]) -> torch.Tensor:
    """[B, s, s] per scale -> [B, L] in pyramid order (row-major within a scale)."""
    return torch.cat([tokens.reshape(tokens.shape[0], -1) for tokens in token_maps], dim=1)


def next_scale_loss(
    logits: torch.Tensor, token_maps: list[torch.Tensor], label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, per_scale_loss [K], per_scale_accuracy [K]).

    logits: [B, L, V] from `VAR.forward`; token_maps: the targets, one [B, s, s] map per scale.
    `loss` carries the gradient; the per-scale figures are detached statistics.
    """
    targets = flatten_token_maps(token_maps)
    if logits.ndim != 3 or logits.shape[:2] != targets.shape:
        raise ValueError(
            f"logits: expected [B, L, V] with [B, L] = {tuple(targets.shape)} from token_maps (got {tuple(logits.shape)})"
        )
    vocab = logits.shape[-1]
    token_loss = F.cross_entropy(
        logits.float().reshape(-1, vocab), targets.reshape(-1), reduction="none", label_smoothing=label_smoothing
    ).view_as(targets)
    loss = token_loss.mean()
    with torch.no_grad():
        correct = (logits.argmax(dim=-1) == targets).float()
        sizes = [tokens[0].numel() for tokens in token_maps]
        per_scale_loss = torch.stack([chunk.mean() for chunk in token_loss.detach().split(sizes, dim=1)])
        per_scale_accuracy = torch.stack([chunk.mean() for chunk in correct.split(sizes, dim=1)])
    return loss, per_scale_loss, per_scale_accuracy
