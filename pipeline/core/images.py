"""Images on the ground floor: the one PNG codec, the one tiler, and the conversions between the layouts
the stages meet (model floats, uint8 arrays, PNG bytes)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def float_to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [N,C,H,W] in [0,1] -> uint8 [N,H,W] (one channel) or [N,H,W,C], rounded as PNG writers do."""
    array = (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()
    array = array.transpose(0, 2, 3, 1)
    return array[..., 0] if array.shape[-1] == 1 else array


def uint8_to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W] or [N,H,W,C] -> float [N,C,H,W] in [-1,1] (the tokenizer's input range)."""
    batch = torch.as_tensor(np.array(images, dtype=np.float32))
    batch = batch.unsqueeze(1) if batch.ndim == 3 else batch.permute(0, 3, 1, 2)
    return batch / 127.5 - 1.0


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 [N,H,W(,C)] to size x size with PIL's LANCZOS (as pipeline.data.reader does); no-op at that size."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))
                     for image in images])


def to_grayscale(images: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W,3] -> [N,H,W] (ITU-R 601 luma, as PIL's 'L'); [N,H,W] passes through."""
    if images.ndim == 3:
        return images
    weights = np.array([0.299, 0.587, 0.114])
    return (images[..., :3].astype(np.float64) @ weights).round().clip(0, 255).astype(np.uint8)


def encode_png(image: np.ndarray, compress_level: int = 6) -> bytes:
    """uint8 [H,W], [H,W,1] or [H,W,3] -> PNG bytes (deterministic: same pixels and level, same bytes).
    Level 6 is PIL's default; shards use 1 (a little larger, several times faster to write, same decode)."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image).save(
        buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def tile(images: np.ndarray, rows: int, padding: int = 2) -> np.ndarray:
    """uint8 [N, C, H, W] -> one [rows * (H + p) - p, cols * (W + p) - p, C] image, row-major, white gaps."""
    count, channels, height, width = images.shape
    cols = -(-count // rows)
    grid = np.full((rows * (height + padding) - padding, cols * (width + padding) - padding, channels), 255,
                   dtype=np.uint8)
    for index, image in enumerate(images):
        row, col = divmod(index, cols)
        top, left = row * (height + padding), col * (width + padding)
        grid[top:top + height, left:left + width] = image.transpose(1, 2, 0)
    return grid
