"""Generate many images in fixed batches: the one loop that grids, generated sets and evaluation use."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from var_model.generation import generate
from var_model.sampling_settings import SamplingSettings
from var_model.transformer import VAR
from var_model.vqvae import VQVAE


@torch.inference_mode()
def generate_in_batches(var: VAR, tokenizer: VQVAE, labels: Sequence[int], seeds: Sequence[int],
                        sampling: SamplingSettings, batch_size: int = 64) -> torch.Tensor:
    """float images [N, C, H, W] in [0, 1], image i drawn from `labels[i]` with its own seed `seeds[i]`.

    Each image depends only on its label and seed, and the batches are cut the same way every time,
    so the same labels and seeds give the same pixels in any run.
    """
    if len(labels) != len(seeds):
        raise ValueError(f"seeds: one per label ({len(labels)}), got {len(seeds)}")
    device = next(var.parameters()).device
    chunks = []
    for start in range(0, len(labels), batch_size):
        label_batch = torch.tensor(list(labels[start:start + batch_size]), dtype=torch.long, device=device)
        seed_batch = torch.tensor(list(seeds[start:start + batch_size]), dtype=torch.long)
        chunks.append(generate(var, tokenizer, label_batch, seeds=seed_batch, **sampling.as_kwargs()).images)
    return torch.cat(chunks)
