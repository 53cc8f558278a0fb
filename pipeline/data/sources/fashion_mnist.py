"""Fashion-MNIST from its official IDX files (gzip-compressed or not), from any folder that holds them.

The default folder is the Debian package `dataset-fashion-mnist`'s; `VARRAY_FASHION_MNIST_DIR`
overrides it.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def default_dir() -> str:
    return os.environ.get("VARRAY_FASHION_MNIST_DIR", DEFAULT_DIR)


def _open(folder: Path, stem: str):
    for name in (stem + ".gz", stem):
        path = folder / name
        if path.exists():
            return gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")
    raise FileNotFoundError(f"{stem}[.gz] not found in {folder} (install the Debian package dataset-fashion-mnist)")


def read_idx(stream) -> np.ndarray:
    """Parse one IDX array: 2 zero bytes, dtype byte (0x08 = uint8), ndim byte, big-endian uint32 dims."""
    header = stream.read(4)
    if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] != 0x08:
        raise ValueError(f"not a uint8 IDX file (header {header!r})")
    ndim = header[3]
    dims = np.frombuffer(stream.read(4 * ndim), dtype=">u4").astype(int)
    data = np.frombuffer(stream.read(), dtype=np.uint8)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"IDX payload has {data.size} bytes, header says {tuple(dims)}")
    return data.reshape(tuple(dims))


def load_fashion_mnist(split: str = "train", folder: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N, 28, 28], labels int64 [N]) of `split` ('train' or 'test')."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    root = Path(folder or default_dir())
    images_stem, labels_stem = _FILES[split]
    with _open(root, images_stem) as f:
        images = read_idx(f)
    with _open(root, labels_stem) as f:
        labels = read_idx(f).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels")
    return images, labels
