"""Turn a source (Fashion-MNIST IDX files or an image folder) into WebDataset shards per split.

Splits: Fashion-MNIST has its official `train` and `test`; an image folder is `train`. A
`validation` split can be carved from `train` (`val_fraction`), by a seeded permutation, so the
same command always writes the same shards. Write order is that permutation too: classes are
mixed inside every shard, which file shuffling plus a local shuffle buffer rely on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field, model_validator
from tqdm import tqdm

from pipeline.configuration import StrictModel
from pipeline.errors import VarrayError
from pipeline.shards import Sample, ShardIndex, write_shards
from pipeline.sources import fashion_mnist, image_folder
from pipeline.storage import Location, StorageOptions, join_uri

logger = logging.getLogger(__name__)

VALIDATION = "validation"


class SourceError(VarrayError, ValueError):
    """The source cannot be sharded (missing files, not images, wrong layout); one line saying why."""


class MakeShardsConfig(StrictModel):
    source: Literal["fashion-mnist", "folder"]
    input: Location | None = None  # Fashion-MNIST: folder with the IDX files (default: the Debian package's)
    output: Location  # URI: local folder or s3://bucket/prefix
    image_size: int | None = Field(default=None, ge=8, le=4096)  # default: 28 for Fashion-MNIST
    channels: Literal[1, 3] | None = None  # default: 1 for Fashion-MNIST, 3 for a folder
    splits: list[str] | None = None  # source splits to write; default: train+test / train
    val_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    samples_per_shard: int = Field(default=1000, ge=1)
    prefix: str = Field(default="shard", pattern=r"^[A-Za-z0-9_-]+$")
    limit: int | None = Field(default=None, ge=1)  # at most this many samples per split (tests, demos)
    seed: int = 0

    @model_validator(mode="after")
    def _check_source(self) -> MakeShardsConfig:
        allowed = {"fashion-mnist": {"train", "test"}, "folder": {"train"}}[self.source]
        unknown = set(self.splits or []) - allowed
        if unknown:
            raise ValueError(f"splits {sorted(unknown)} not in {sorted(allowed)} for source {self.source}")
        if self.source == "folder" and not self.input:
            raise ValueError("input: an image folder is required for source 'folder'")
        if self.source == "folder" and self.image_size is None:
            raise ValueError("image_size: required for source 'folder' (images come in any size)")
        return self

    @property
    def resolved_image_size(self) -> int:
        return self.image_size or 28

    @property
    def resolved_channels(self) -> int:
        return self.channels or (1 if self.source == "fashion-mnist" else 3)

    @property
    def source_splits(self) -> list[str]:
        return self.splits or (["train", "test"] if self.source == "fashion-mnist" else ["train"])


def _assign(count: int, split: str, config: MakeShardsConfig) -> dict[str, np.ndarray]:
    """Indices per output split, in write order (a seeded permutation)."""
    order = np.random.default_rng(config.seed).permutation(count)
    if split == "train" and config.val_fraction > 0:
        n_val = max(1, round(count * config.val_fraction))
        parts = {"train": order[n_val:], VALIDATION: order[:n_val]}
    else:
        parts = {split: order}
    return {name: idx[: config.limit] if config.limit else idx for name, idx in parts.items()}


def _fashion_samples(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, split: str,
                     config: MakeShardsConfig) -> Iterator[Sample]:
    size, channels = config.resolved_image_size, config.resolved_channels
    for i in indices:
        image = images[i]
        if size != image.shape[0] or channels == 3:
            pil = Image.fromarray(image).convert("L" if channels == 1 else "RGB")
            image = np.asarray(image_folder.resize_center_crop(pil, size))
        yield Sample(key=f"fmnist_{split}_{int(i):05d}", image=image, label=int(labels[i]),
                     metadata={"source": "fashion-mnist", "split": split, "index": int(i)})


def _folder_samples(items: list, classes: list[str], indices: np.ndarray, config: MakeShardsConfig,
                    skipped: list[str]) -> Iterator[Sample]:
    root = config.input
    for i in indices:
        path, label = items[i]
        image = image_folder.read_image_or_none(path, config.resolved_image_size, config.resolved_channels)
        if image is None:
            skipped.append(str(path))
            continue
        yield Sample(key=f"img_{int(i):07d}", image=image, label=label,
                     metadata={"source": "folder", "path": str(path.relative_to(root)), "class": classes[label]})


def plan(config: MakeShardsConfig) -> dict[str, Any]:
    """What would be written: samples per output split, shard counts, URIs. Reads labels only."""
    counts: dict[str, int] = {}
    if config.source == "fashion-mnist":
        for split in config.source_splits:
            _, labels = fashion_mnist.load_fashion_mnist(split, config.input)
            counts.update({k: len(v) for k, v in _assign(len(labels), split, config).items()})
    else:
        items, _ = image_folder.list_images(config.input)
        counts.update({k: len(v) for k, v in _assign(len(items), "train", config).items()})
    return {
        "output": config.output, "image_size": config.resolved_image_size, "channels": config.resolved_channels,
        "splits": {name: {"samples": n, "shards": -(-n // config.samples_per_shard),
                          "uri": join_uri(config.output, name)} for name, n in counts.items()},
    }


def make_shards(config: MakeShardsConfig, options: StorageOptions | None = None) -> dict[str, ShardIndex]:
    """Write every output split's shards and index; returns the indexes by split name."""
    common = dict(image_size=config.resolved_image_size, channels=config.resolved_channels,
                  prefix=config.prefix, samples_per_shard=config.samples_per_shard, options=options)
    written: dict[str, ShardIndex] = {}
    if config.source == "fashion-mnist":
        folder = config.input or fashion_mnist.default_dir()
        for split in config.source_splits:
            images, labels = fashion_mnist.load_fashion_mnist(split, folder)
            for name, indices in _assign(len(labels), split, config).items():
                samples = tqdm(_fashion_samples(images, labels, indices, split, config), total=len(indices),
                               desc=name, disable=None)
                source = {"name": "fashion-mnist", "input": folder, "split": split, "seed": config.seed,
                          "val_fraction": config.val_fraction}
                written[name] = write_shards(samples, join_uri(config.output, name), split=name,
                                             class_names=list(fashion_mnist.CLASS_NAMES), source=source, **common)
    else:
        items, classes = image_folder.list_images(config.input)
        for name, indices in _assign(len(items), "train", config).items():
            skipped: list[str] = []
            samples = tqdm(_folder_samples(items, classes, indices, config, skipped), total=len(indices),
                           desc=name, disable=None)
            source = {"name": "folder", "input": str(config.input), "seed": config.seed,
                      "val_fraction": config.val_fraction, "unreadable_files": skipped}
            index = write_shards(samples, join_uri(config.output, name), split=name, class_names=classes,
                                 source=source, **common)
            if skipped:
                logger.warning("%s: skipped %d unreadable images (listed in index.json source)", name, len(skipped))
            written[name] = index
    return written
