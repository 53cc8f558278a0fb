"""Conversions between the image layouts the evaluation meets: model floats, uint8 arrays, PNG bytes."""

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
    """Resize uint8 [N,H,W(,C)] to size x size with PIL's LANCZOS (as pipeline.data does); no-op at that size."""
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


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H,W] or [H,W,3] -> PNG bytes (deterministic: same pixels, same bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)
