"""Data-plane test helpers: a generated RGB image folder, PNG bytes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def make_rgb_folder(root: Path, classes: int = 3, per_class: int = 6, size: tuple[int, int] = (48, 40)) -> Path:
    """Class folders of generated images: PNG and JPEG, mostly RGB, one grayscale per class."""
    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            pixels[..., label % 3] = 255  # a class-dependent colour, so labels are visible in pixels
            image = Image.fromarray(pixels)
            if i == 0:
                image = image.convert("L")
            suffix = ".png" if i % 2 else ".jpg"
            image.save(folder / f"img.{i}{suffix}")  # dots in file names must not leak into keys
    return root


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
