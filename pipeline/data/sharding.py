"""Turn a source (Fashion-MNIST IDX files or an image folder) into WebDataset shards per split.

Splits: Fashion-MNIST has its official `train` and `test`; an image folder is `train`. A
`validation` split can be carved from `train` (`val_fraction`), by a seeded permutation, so the
same command always writes the same shards. Write order is that permutation too: classes are
mixed inside every shard, which file shuffling plus a local shuffle buffer rely on.

An image folder's split is cut into one task per output shard (`pipeline.data.shard_writer`):
shard i holds the i-th `samples_per_shard` images of the permutation (fewer when some are refused).
The tasks run in a process pool of `workers` processes on this machine, where the folder is; each
publishes its tar atomically and then its stats file, the shard's commit marker, so a rerun keeps
every finished shard and writes the others. The index is assembled from the stats files last.
Fashion-MNIST (70,000 small images in memory) is written by one process, as one stream.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
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
from pipeline.data import shard_writer
from pipeline.data.shard_writer import ShardTask
from pipeline.data.shards import (
    INDEX_FILE,
    Sample,
    ShardIndex,
    ShardInfo,
    read_index,
    shard_name,
    write_index,
    write_shards,
)
from pipeline.data.sources import fashion_mnist, image_folder
from pipeline.data.sources.label_manifest import MANIFEST_SUFFIXES, LabelManifest, read_label_manifest

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
    # folder: label manifest (JSON or CSV, folder -> class id and name); default: sorted folder names
    labels: Location | None = None
    workers: int | None = Field(default=None, ge=1)  # folder: processes writing shards; default: this machine's CPUs
    keep_jpeg: bool = True  # folder: a JPEG needing no resize or conversion keeps its bytes (stored as .jpg)

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
        if self.labels is not None and self.source != "folder":
            raise ValueError("labels: a label manifest is for source 'folder' only")
        if self.labels is not None and not self.labels.lower().endswith(MANIFEST_SUFFIXES):
            raise ValueError(f"labels: a label manifest is a .json or .csv file (got {self.labels})")
        return self

    @property
    def resolved_workers(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))

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


def _manifest(config: MakeShardsConfig) -> LabelManifest | None:
    return read_label_manifest(config.labels) if config.labels else None


def _folder_tasks(items: list, classes: list[str], indices: np.ndarray, split_uri: str, config: MakeShardsConfig,
                  options: StorageOptions | None) -> list[ShardTask]:
    """One task per output shard: shard i gets the i-th `samples_per_shard` indices of the permutation."""
    root, per_shard = config.input, config.samples_per_shard
    tasks = []
    for number, start in enumerate(range(0, len(indices), per_shard)):
        entries = []
        for i in indices[start:start + per_shard]:
            path, label = items[i]
            entries.append((f"img_{int(i):07d}", str(path), int(label), str(path.relative_to(root)), classes[label]))
        tasks.append(ShardTask(split_uri=split_uri, name=shard_name(config.prefix, number), items=tuple(entries),
                               image_size=config.resolved_image_size, channels=config.resolved_channels,
                               max_pixels=config.max_image_pixels, keep_jpeg=config.keep_jpeg, options=options))
    return tasks


def _init_worker(level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _run_tasks(tasks: list[ShardTask], workers: int) -> Iterator[dict[str, Any]]:
    """Each task's stats, as the tasks finish, at most `workers` at a time: in this process for one worker;
    as Ray tasks when this process is a Ray driver (the chain's data.create); else in a process pool.

    The pool's processes are forked (they start at once, with this process's imports; nothing else
    starts, so the job needs no cluster). A Ray driver holds Ray's threads, which a fork does not
    survive safely, so there the tasks are Ray tasks of 1 CPU each, pinned to this node, where the
    folder is. On the first failure the tasks not started are cancelled; the shards already published
    stay (a rerun keeps them).
    """
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield shard_writer.write_shard(task)
        return
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        yield from _run_on_ray(ray, tasks, workers)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=multiprocessing.get_context("fork"),
                             initializer=_init_worker, initargs=(logging.getLogger().getEffectiveLevel(),)) as pool:
        pending = {pool.submit(shard_writer.write_shard, task) for task in tasks}
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()
                yield future.result()


def _run_on_ray(ray, tasks: list[ShardTask], workers: int) -> Iterator[dict[str, Any]]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    remote = ray.remote(shard_writer.write_shard).options(num_cpus=1, scheduling_strategy=here, max_retries=0)
    waiting, running = list(tasks), []
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                running.append(remote.remote(waiting.pop(0)))
            done, running = ray.wait(running, num_returns=1)
            yield ray.get(done[0])
    except BaseException:
        for ref in running:
            ray.cancel(ref)
        raise


def _write_folder_split(tasks: list[ShardTask], split_uri: str, config: MakeShardsConfig, *, split: str,
                        class_names: list[str], source: dict[str, Any], options: StorageOptions | None) -> ShardIndex:
    """Run the split's shard tasks; the index from their stats files, in shard order."""
    results: dict[str, dict[str, Any]] = {}
    with tqdm(total=sum(len(task.items) for task in tasks), desc=split, disable=None) as progress:
        for stats in _run_tasks(tasks, config.resolved_workers):
            results[stats["name"]] = stats
            progress.update(stats["samples"] + len(stats["refused"]))
    ordered = [results[task.name] for task in tasks]
    skipped = sum(stats["skipped"] for stats in ordered)
    logger.info("%s: %d shards written, %d finished ones kept (%d workers)", split, len(ordered) - skipped, skipped,
                min(config.resolved_workers, len(tasks)))
    shards = [ShardInfo(name=stats["name"], samples=stats["samples"], bytes=stats["bytes"])
              for stats in ordered if stats["samples"]]
    if not shards:
        raise ValueError(f"{split_uri}: no samples to write for split {split!r}")
    refused = [path for stats in ordered for path in stats["refused"]]
    reasons: dict[str, int] = {}
    for stats in ordered:
        for reason, count in stats["refused_reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    source = {**source, "unreadable_files": refused, "refused_reasons": reasons,
              "kept_jpeg": sum(stats["kept_jpeg"] for stats in ordered)}
    index = ShardIndex(split=split, shards=shards, total=sum(s.samples for s in shards), class_names=class_names,
                       image_size=config.resolved_image_size, channels=config.resolved_channels, source=source)
    write_index(index, split_uri, options)
    return index


def plan(config: MakeShardsConfig) -> dict[str, Any]:
    """What would be written: samples per output split, shard counts, URIs. Reads labels only."""
    counts: dict[str, int] = {}
    if config.source == "fashion-mnist":
        for split in config.source_splits:
            _, labels = fashion_mnist.load_fashion_mnist(split, config.input)
            counts.update({k: len(v) for k, v in _assign(len(labels), split, config).items()})
    else:
        items, _ = image_folder.list_images(config.input, _manifest(config))
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
                split_uri = join_uri(config.output, name)
                written[name] = _write_split(
                    lambda samples=samples, split_uri=split_uri, name=name, source=source: write_shards(
                        samples, split_uri, split=name, class_names=list(fashion_mnist.CLASS_NAMES), source=source,
                        **common),
                    split_uri, prefix=config.prefix, options=options)
    else:
        manifest = _manifest(config)
        items, classes = image_folder.list_images(config.input, manifest)
        folders = list(manifest.folders) if manifest else list(classes)
        for name, indices in _assign(len(items), "train", config).items():
            split_uri = join_uri(config.output, name)
            tasks = _folder_tasks(items, classes, indices, split_uri, config, options)
            source = {"name": "folder", "input": str(config.input), "seed": config.seed,
                      "val_fraction": config.val_fraction, "max_image_pixels": config.max_image_pixels,
                      "label_manifest": config.labels, "class_folders": folders, "keep_jpeg": config.keep_jpeg}
            index = _write_split(
                lambda tasks=tasks, split_uri=split_uri, name=name, source=source: _write_folder_split(
                    tasks, split_uri, config, split=name, class_names=classes, source=source, options=options),
                split_uri, prefix=config.prefix, options=options, planned={task.name for task in tasks})
            if index.source["unreadable_files"]:
                reasons = index.source["refused_reasons"]
                logger.warning("%s: refused %d images (%s; listed in index.json source)", name,
                               len(index.source["unreadable_files"]),
                               ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items())))
            written[name] = index
    return written


def refused_images(index: ShardIndex) -> dict[str, Any]:
    """{"images": n, "reasons": {reason: count}} of the files a folder split refused (none for Fashion-MNIST)."""
    return {"images": len(index.source.get("unreadable_files") or []),
            "reasons": dict(index.source.get("refused_reasons") or {})}


def _is_shard_or_stats(name: str, prefix: str) -> bool:
    return re.fullmatch(rf"{re.escape(prefix)}-\d{{6}}(\.tar|{re.escape(shard_writer.STATS_SUFFIX)})", name) is not None


def _is_our_name(name: str, prefix: str) -> bool:
    """A name make_shards writes in a split folder: its shards and their stats files, index, in-progress mark,
    or their staging files."""
    if name in (INDEX_FILE, IN_PROGRESS_FILE) or _is_shard_or_stats(name, prefix):
        return True
    staged = re.fullmatch(r"\.(.+)\.[a-z0-9_]{8}\.tmp", name)
    return bool(staged) and is_staging_name(name, staged.group(1)) and _is_our_name(staged.group(1), prefix)


def _write_split(write: Callable[[], ShardIndex], split_uri: str, *, prefix: str, options: StorageOptions | None,
                 planned: set[str] | None = None) -> ShardIndex:
    """`write()` the split into a folder that is empty or make_shards' own; removes only names it wrote.

    The listing is also the first call to the storage: refused credentials or an unreachable endpoint
    fail here, before any image is read. A folder holding anything else is refused, untouched. A
    previous run's index is removed before the shards are written (the split is incomplete until the
    new index lands); after, every shard or stats file of ours that the new split does not hold (by
    the new index, or the `planned` shard names and their stats) is removed, and staging files of a
    killed run are removed first.
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
    index = write()
    kept = set(planned) if planned is not None else {shard.name for shard in index.shards}
    kept |= {shard_writer.stats_name(name) for name in kept}
    for name in names:
        if _is_shard_or_stats(name, prefix) and name not in kept:
            remove(join_uri(split_uri, name), options)
    remove(mark, options)
    return index
