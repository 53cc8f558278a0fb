"""Tokenizer reconstruction quality: PSNR between images and their encode -> decode round trip."""

from __future__ import annotations

import numpy as np
import torch

# An exact reconstruction has infinite PSNR; report this ceiling instead so means stay finite.
MAX_PSNR_DB = 100.0


def psnr(reference: np.ndarray, reconstruction: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Per-image PSNR in dB (float64 [N]) of two same-shape batches [N, ...] on a scale of `data_range`."""
    reference = np.asarray(reference, dtype=np.float64)
    reconstruction = np.asarray(reconstruction, dtype=np.float64)
    if reference.shape != reconstruction.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {reconstruction.shape}")
    mse = ((reference - reconstruction) ** 2).reshape(len(reference), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(data_range ** 2 / mse)
    return np.minimum(values, MAX_PSNR_DB)


@torch.inference_mode()
def reconstruct(tokenizer: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """encode_tokens -> decode_tokens of float images [N,C,H,W] in [-1,1]; same range out (clamped)."""
    outputs = []
    for start in range(0, len(images), batch_size):
        token_maps = tokenizer.encode_tokens(images[start:start + batch_size])
        outputs.append(tokenizer.decode_tokens(token_maps).clamp(-1.0, 1.0))
    return torch.cat(outputs) if outputs else images.new_zeros((0, *images.shape[1:]))
