"""A sample grid PNG: one row per class, `per_class` images each, from a tokenizer + VAR export."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from var_model import VAR, VQVAE, generate

GRID_PADDING = 2  # pixels of white between tiles


@torch.inference_mode()
def sample_grid(var: VAR, tokenizer: VQVAE, classes: list[int], per_class: int, *, cfg: float, top_k: int,
                top_p: float, seed: int, batch_size: int = 64) -> np.ndarray:
    """uint8 [rows * H, per_class * W, C] grid; sample i of the grid uses seed `seed + i`, so the same
    settings give the same picture in any batch split."""
    labels = torch.tensor([label for label in classes for _ in range(per_class)], dtype=torch.long)
    seeds = seed + torch.arange(len(labels), dtype=torch.long)
    images = torch.cat([generate(var, tokenizer, labels[start:start + batch_size], cfg=cfg, top_k=top_k,
                                 top_p=top_p, seeds=seeds[start:start + batch_size]).images
                        for start in range(0, len(labels), batch_size)])
    return tile(images.clamp(0, 1).mul(255).round().to(torch.uint8).numpy(), rows=len(classes))


def tile(images: np.ndarray, rows: int, padding: int = GRID_PADDING) -> np.ndarray:
    """uint8 [N, C, H, W] -> one [rows * (H + p) - p, cols * (W + p) - p, C] image, row-major."""
    count, channels, height, width = images.shape
    cols = -(-count // rows)
    grid = np.full((rows * (height + padding) - padding, cols * (width + padding) - padding, channels), 255,
                   dtype=np.uint8)
    for index, image in enumerate(images):
        row, col = divmod(index, cols)
        top, left = row * (height + padding), col * (width + padding)
        grid[top:top + height, left:left + width] = image.transpose(1, 2, 0)
    return grid


def png_bytes(grid: np.ndarray) -> bytes:
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


__all__ = ["sample_grid", "tile", "png_bytes"]
