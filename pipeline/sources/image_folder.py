"""ImageNet-style image folder: `<root>/<class name>/<image>.{jpg,jpeg,png}`, any size, RGB or gray.

Images are converted to the wanted channel count and, like the official VAR data pipeline,
resized so the short side matches the target (LANCZOS) and center-cropped to a square.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def list_classes(root: str | Path) -> list[str]:
    """Sorted subfolder names: class i is the i-th name (torchvision ImageFolder's rule)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root} has no class subfolders")
    return classes


def list_images(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """([(path, label)] sorted by class then file name, class names)."""
    root = Path(root)
    classes = list_classes(root)
    items = [(path, label) for label, name in enumerate(classes)
             for path in sorted((root / name).rglob("*")) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise ValueError(f"image folder {root} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return items, classes


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale so the short side is `size`, then cut the central `size` x `size` square."""
    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.LANCZOS)
        width, height = image.size
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


def load_image(path: str | Path, size: int, channels: int) -> np.ndarray:
    """uint8 [size, size] (channels=1) or [size, size, 3] (channels=3)."""
    with Image.open(path) as image:
        image.load()
        converted = image.convert("L" if channels == 1 else "RGB")
    return np.asarray(resize_center_crop(converted, size))


def read_image_or_none(path: Path, size: int, channels: int) -> np.ndarray | None:
    """The image, or None (logged) when the file is not a readable image."""
    try:
        return load_image(path, size, channels)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        logger.warning("skipping unreadable image %s: %s", path, exc)
        return None
