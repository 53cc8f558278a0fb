"""The real images an evaluation compares against: a reference split (what generated images are judged
against) and a train split (the classifier's training data and the real-vs-real floor).

Where they come from (`reference.source`):
- `run`: the run's own splits, as its config.json records them (`data.validation` is the reference,
  `data.train` the train split);
- `shards`: any shard split (`reference.shards_uri`; make_shards' shards with index.json, or WebDataset
  shards another tool wrote, indexed by one listing pass), the train split from `reference.train_shards_uri`,
  else the run's, else the one the tokenizer export was trained on;
- `fashion-mnist`: the Fashion-MNIST IDX files (the `fashion-mnist` preset): test is the reference, train
  the train split, both at their native 28x28.

Either way a split is read as a seeded subset, `RealImages`: the first `count` indices of a seeded
permutation of the split, read straight from the shard files (no Ray: evaluation-sized subsets only),
in permutation order, so the first N rows are "the N-sample subset" for every N <= count.
"""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from pipeline.core.errors import VarrayError
from pipeline.core.storage import StorageError, exists, join_uri, pyarrow_filesystem, read_bytes
from pipeline.data.listing import image_entry, label_from_json, load_index
from pipeline.data.shards import ShardIndex, ShardIndexError
from pipeline.data.sources import fashion_mnist
from pipeline.data.sources.image_folder import ImageRefused, resize_center_crop, to_gray_or_rgb
from pipeline.data.tar_samples import iter_tar_samples

logger = logging.getLogger(__name__)


class ReferenceError(VarrayError, ValueError):
    """The reference or train split cannot be found or read; one line naming the field."""


@dataclass(frozen=True)
class SplitSource:
    """Where one split of real images is: shards (a URI + label key) or a Fashion-MNIST split."""

    kind: str  # "shards" | "fashion-mnist"
    uri: str  # split folder URI, or the IDX folder
    split: str  # "train" | "test" for Fashion-MNIST; the shards' split name otherwise
    label_key: str | None = None
    index: ShardIndex | None = None  # shards: their index
    arrays: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # Fashion-MNIST: (images, labels)

    @property
    def total(self) -> int:
        return self.index.total if self.index is not None else len(self.arrays[1])

    @property
    def class_names(self) -> list[str]:
        return list(self.index.class_names) if self.index is not None else list(fashion_mnist.CLASS_NAMES)

    @property
    def image_size(self) -> int:
        return self.index.image_size if self.index is not None else int(self.arrays[0].shape[1])

    @property
    def channels(self) -> int:
        return self.index.channels if self.index is not None else 1

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "uri": self.uri, "split": self.split, "images": self.total,
                "image_size": self.image_size, "channels": self.channels, "label_key": self.label_key}


@dataclass
class RealImages:
    images: np.ndarray  # uint8 [N,H,W] (1 channel) or [N,H,W,3], at the requested size and channels
    labels: np.ndarray  # int64 [N], class ids of the split's class_names
    source: SplitSource
    skipped: int = 0  # samples that could not be decoded (logged)
    identity: dict[str, Any] = field(default_factory=dict)  # what keys caches of anything computed from them


def shard_split(uri: str, field_name: str, label_key: str | None = None) -> SplitSource:
    """A shard split, its index read now: a ReferenceError naming `field_name` when it cannot be."""
    try:
        index = load_index(uri, label_key=label_key)
    except (StorageError, ShardIndexError, OSError, ValueError) as exc:
        raise ReferenceError(f"{field_name}: {uri}: {str(exc).splitlines()[0][:200]}") from None
    return SplitSource("shards", uri, index.split, label_key, index)


def fashion_mnist_split(split: str, folder: str | None) -> SplitSource:
    folder = folder or fashion_mnist.default_dir()
    try:
        arrays = fashion_mnist.load_fashion_mnist(split, folder)  # 70k small images: read once, kept
    except (FileNotFoundError, ValueError) as exc:
        raise ReferenceError(f"reference.folder: {exc}") from None
    return SplitSource("fashion-mnist", folder, split, arrays=arrays)


def run_data_config(run_config_uri: str) -> dict[str, Any] | None:
    """The `data` section of a run's config.json (what train_var resolved), or None without one."""
    if not exists(run_config_uri):
        return None
    try:
        data = json.loads(read_bytes(run_config_uri)).get("data")
    except (ValueError, AttributeError):
        raise ReferenceError(f"model.run: {run_config_uri} is not a JSON run config") from None
    return data if isinstance(data, dict) else None


def subset_order(total: int, seed: int, stream: int) -> np.ndarray:
    """A seeded permutation of a split's indices: its first N are the N-sample subset (fixed per seed)."""
    return np.random.default_rng([seed, stream]).permutation(total)


def to_form(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 images brought to `size` x `size` (LANCZOS, short side + center crop) and 1 or 3 channels."""
    if len(images) == 0:
        shape = (0, size, size) if channels == 1 else (0, size, size, 3)
        return np.zeros(shape, dtype=np.uint8)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    same_size = images.shape[1:3] == (size, size)
    same_channels = (images.ndim == 3) == (channels == 1)
    if same_size and same_channels:
        return images
    mode = "L" if channels == 1 else "RGB"
    return np.stack([np.asarray(resize_center_crop(Image.fromarray(image).convert(mode), size)) for image in images])


def _decode(raw: bytes | None, size: int, channels: int) -> np.ndarray:
    if raw is None:
        raise ValueError("no image entry")
    with Image.open(io.BytesIO(raw)) as image:
        image.load()
        picture = to_gray_or_rgb(image).convert("L" if channels == 1 else "RGB")
    return np.asarray(resize_center_crop(picture, size))


def _label(sample: dict[str, Any], source: SplitSource) -> int:
    if source.label_key is None:
        return int(sample["cls"].decode().strip())
    value = label_from_json(sample["json"], source.label_key)
    return source.class_names.index(value) if isinstance(value, str) else int(value)


def _read_shards(source: SplitSource, wanted: np.ndarray, size: int, channels: int) -> tuple[dict, int]:
    """{split index: (image, label)} of the `wanted` indices (counted in index order over the shards)."""
    fs, root = pyarrow_filesystem(source.uri)
    by_shard: dict[int, set[int]] = defaultdict(set)
    starts, start = [], 0
    for shard in source.index.shards:
        starts.append(start)
        start += shard.samples
    for position in wanted.tolist():
        shard_number = int(np.searchsorted(starts, position, side="right")) - 1
        by_shard[shard_number].add(position)
    suffixes = ["png", "jpg", "jpeg", "webp", "json" if source.label_key else "cls"]
    found: dict[int, tuple[np.ndarray, int]] = {}
    skipped = 0
    for shard_number in sorted(by_shard):
        shard = source.index.shards[shard_number]
        wanted_here = by_shard[shard_number]
        try:
            with fs.open_input_stream(f"{root.rstrip('/')}/{shard.name}") as stream:
                for offset, sample in enumerate(iter_tar_samples(stream, suffixes)):
                    position = starts[shard_number] + offset
                    if position not in wanted_here:
                        continue
                    try:
                        label = _label(sample, source)
                        if not 0 <= label < len(source.class_names):
                            raise ValueError(f"label {label} out of range")
                        found[position] = (_decode(image_entry(sample), size, channels), label)
                    except (ValueError, KeyError, OSError, ImageRefused) as exc:
                        skipped += 1
                        logger.warning("%s: sample %s skipped: %s", join_uri(source.uri, shard.name),
                                       sample.get("__key__"), str(exc)[:120])
        except OSError as exc:
            raise ReferenceError(f"{join_uri(source.uri, shard.name)}: unreadable shard: {exc}") from None
    return found, skipped


def read_split(source: SplitSource, count: int, seed: int, stream: int, size: int, channels: int) -> RealImages:
    """The first `count` images of the split's seeded permutation, at `size` and `channels`."""
    count = min(count, source.total)
    order = subset_order(source.total, seed, stream)[:count]
    identity = {**source.describe(), "seed": seed, "stream": stream, "size": size, "channels": channels}
    if source.kind == "fashion-mnist":
        images, labels = source.arrays
        return RealImages(to_form(images[order], size, channels), labels[order].astype(np.int64), source,
                          identity=identity)
    found, skipped = _read_shards(source, order, size, channels)
    kept = [position for position in order.tolist() if position in found]
    empty = np.zeros((0, size, size) if channels == 1 else (0, size, size, 3), dtype=np.uint8)
    images = np.stack([found[p][0] for p in kept]) if kept else empty
    labels = np.array([found[p][1] for p in kept], dtype=np.int64)
    return RealImages(images, labels, source, skipped=skipped, identity=identity)
