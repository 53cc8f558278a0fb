"""FastVAR-style token pruning at the largest scales (Guo et al. 2025, "cached token pruning"): a
training-free speed-up, off by default.

At a pruned scale only the tokens that are still changing go through the transformer: those whose
input (the accumulated latent at this scale) differs most from the previous scale's input upsampled
to this size. The others take the previous scale's logits at their parent position, upsampled (what
FastVAR's restoration from the previous scale's cached hidden states gives after the same head).
"""

from __future__ import annotations

import math

import torch


def nearest_upsample(rows: torch.Tensor, side: int, new_side: int) -> torch.Tensor:
    """[B, side**2, D] row-major positions -> [B, new_side**2, D], each taking its nearest parent
    (`F.interpolate(mode="nearest")`'s rule: parent = floor(i * side / new_side))."""
    parents = torch.arange(new_side, device=rows.device) * side // new_side
    grid = rows.view(rows.shape[0], side, side, rows.shape[-1])
    return grid[:, parents][:, :, parents].reshape(rows.shape[0], new_side * new_side, rows.shape[-1])


def changing_tokens(latent_input: torch.Tensor, previous_input: torch.Tensor, keep: float) -> torch.Tensor:
    """Positions [B, m] (ascending) of the ceil(keep * n) tokens whose input [B, n, C] moved most from
    the previous scale's input [B, n_prev, C] upsampled to this scale."""
    side, previous_side = math.isqrt(latent_input.shape[1]), math.isqrt(previous_input.shape[1])
    change = (latent_input - nearest_upsample(previous_input, previous_side, side)).norm(dim=-1)
    count = max(1, math.ceil(keep * latent_input.shape[1]))
    return change.topk(count, dim=1).indices.sort(dim=1).values
