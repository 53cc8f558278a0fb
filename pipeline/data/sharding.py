"""Turn a source (Fashion-MNIST IDX files or an image folder) into WebDataset shards per split.

Splits: Fashion-MNIST has its official `train` and `test`; an image folder is `train`. A
`validation` split can be carved from `train` (`val_fraction`), by a seeded permutation, so the
same command always writes the same shards. Write order is that permutation too: classes are
mixed inside every shard, which file shuffling plus a local shuffle buffer rely on.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field, model_validator
from tqdm import tqdm

from pipeline.core.configuration import StrictModel
from pipeline.core.errors import VarrayError
from pipeline.core.storage import (
    Location,
    StorageOptions,
    exists,
    is_staging_name,
    join_uri,
    list_files,
    remove,
    write_bytes_atomic,
)
from pipeline.data.shards import INDEX_FILE, Sample, ShardIndex, read_index, write_shards
from pipeline.data.sources import fashion_mnist, image_folder

logger = logging.getLogger(__name__)

VALIDATION = "validation"
# Written before a split's first shard, removed once its index.json is: marks a split being written by
# make_shards, so a rerun after a crash knows the shards there are its own.
IN_PROGRESS_FILE = ".make_shards-in-progress.json"


class SourceError(VarrayError, ValueError):
    """The source cannot be sharded (missing files, not images, wrong layout); one line saying why."""


class ShardOutputError(VarrayError, ValueError):
    """The output split folder holds files make_shards did not write; nothing there is touched."""


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
    max_image_pixels: int = Field(default=image_folder.MAX_PIXELS, ge=1)  # folder: larger images are refused

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
                    skipped: list[str], reasons: dict[str, int]) -> Iterator[Sample]:
    root = config.input
    for i in indices:
        path, label = items[i]
        image, refusal = image_folder.read_image_or_refusal(path, config.resolved_image_size,
                                                            config.resolved_channels, config.max_image_pixels)
        if refusal is not None:
            skipped.append(str(path))
            reasons[refusal.reason] = reasons.get(refusal.reason, 0) + 1
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
                written[name] = _write_split(samples, join_uri(config.output, name), split=name,
                                             class_names=list(fashion_mnist.CLASS_NAMES), source=source, **common)
    else:
        items, classes = image_folder.list_images(config.input)
        for name, indices in _assign(len(items), "train", config).items():
            # Filled while the shards are written, before the index (which records them) is.
            skipped: list[str] = []
            reasons: dict[str, int] = {}
            samples = tqdm(_folder_samples(items, classes, indices, config, skipped, reasons), total=len(indices),
                           desc=name, disable=None)
            source = {"name": "folder", "input": str(config.input), "seed": config.seed,
                      "val_fraction": config.val_fraction, "max_image_pixels": config.max_image_pixels,
                      "unreadable_files": skipped, "refused_reasons": reasons}
            index = _write_split(samples, join_uri(config.output, name), split=name, class_names=classes,
                                 source=source, **common)
            if skipped:
                logger.warning("%s: refused %d images (%s; listed in index.json source)", name, len(skipped),
                               ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items())))
            written[name] = index
    return written


def refused_images(index: ShardIndex) -> dict[str, Any]:
    """{"images": n, "reasons": {reason: count}} of the files a folder split refused (none for Fashion-MNIST)."""
    return {"images": len(index.source.get("unreadable_files") or []),
            "reasons": dict(index.source.get("refused_reasons") or {})}


def _is_our_name(name: str, prefix: str) -> bool:
    """A name make_shards writes in a split folder: its shards, index, in-progress mark, or their staging files."""
    if name in (INDEX_FILE, IN_PROGRESS_FILE) or re.fullmatch(rf"{re.escape(prefix)}-\d{{6}}\.tar", name):
        return True
    staged = re.fullmatch(r"\.(.+)\.[a-z0-9_]{8}\.tmp", name)
    return bool(staged) and is_staging_name(name, staged.group(1)) and _is_our_name(staged.group(1), prefix)


def _write_split(samples: Iterable[Sample], split_uri: str, *, prefix: str, options: StorageOptions | None,
                 **kwargs: Any) -> ShardIndex:
    """write_shards into a folder that is empty or make_shards' own; removes only names it wrote.

    The listing is also the first call to the storage: refused credentials or an unreachable endpoint
    fail here, before any image is read. A folder holding anything else is refused, untouched. A
    previous run's index is removed before its shards are rewritten (the split is incomplete until the
    new index lands), shards it listed that the new index does not are removed after, and staging files
    of a killed run are removed.
    """
    names = [uri.replace("\\", "/").rsplit("/", 1)[-1] for uri in list_files(split_uri, options=options)] \
        if exists(split_uri, options) else []
    foreign = sorted(name for name in names if not _is_our_name(name, prefix))
    if foreign:
        raise ShardOutputError(f"{split_uri}: holds {len(foreign)} file(s) make_shards did not write "
                               f"({', '.join(foreign[:3])}); give an empty folder or a new output")
    old_index = read_index(split_uri, options) if INDEX_FILE in names else None  # ShardIndexError if not ours
    shards_there = [name for name in names if name.endswith(".tar")]
    if shards_there and old_index is None and IN_PROGRESS_FILE not in names:
        raise ShardOutputError(f"{split_uri}: holds shards ({shards_there[0]}, ...) but no index.json or mark of "
                               f"a make_shards run; give an empty folder or a new output")
    for name in names:
        if name.startswith(".") and name.endswith(".tmp"):
            logger.info("removing staging file %s of an earlier run", join_uri(split_uri, name))
            remove(join_uri(split_uri, name), options)
    mark = join_uri(split_uri, IN_PROGRESS_FILE)
    write_bytes_atomic(mark, json.dumps({"prefix": prefix, "started": time.time()}).encode(), options)
    if old_index is not None:
        remove(join_uri(split_uri, INDEX_FILE), options)
    index = write_shards(samples, split_uri, prefix=prefix, options=options, **kwargs)
    if old_index is not None:
        kept = {shard.name for shard in index.shards}
        for shard in old_index.shards:
            if shard.name not in kept:
                remove(join_uri(split_uri, shard.name), options)
    remove(mark, options)
    return index
