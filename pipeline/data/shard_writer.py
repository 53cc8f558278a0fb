"""One output shard of make_shards' folder source: the task a worker process runs.

A task names its shard (`<prefix>-000003.tar`), the images that go into it (keys, paths, labels) and
the output settings. `write_shard(task)` reads and converts each image
(`pipeline.data.sources.image_folder`; a JPEG that needs no resize or conversion keeps its bytes and
is stored as `<key>.jpg`, every other image as `<key>.png`), streams the tar to a staging file that
`close()` publishes whole (`StagedOutput`), then publishes `<prefix>-000003.stats.json` atomically.

The stats file is the shard's commit marker (img2dataset's rule): it is written only after its tar,
and holds the task's fingerprint (a hash of everything that decides the shard's bytes) with the
shard's sample count and byte size. A rerun finds a shard finished when its stats file carries the
same fingerprint and its tar has that size, and leaves it untouched; any other shard is written
again. The tar's bytes depend only on the task (fixed member times and owners), so a shard written
again is the same file.

This module imports no torch (nor webdataset, which imports it): a worker process starts in well
under a second.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipeline.core.storage import (
    StagedOutput,
    StorageError,
    StorageOptions,
    exists,
    file_size,
    join_uri,
    read_bytes,
    remove,
    write_bytes_atomic,
)
from pipeline.data.sources import image_folder

logger = logging.getLogger(__name__)

STATS_FORMAT = "varray.shard-stats/1"
STATS_SUFFIX = ".stats.json"
_MEMBER_TIME = 1_700_000_000  # every member's mtime: same task, same bytes
PNG_COMPRESS_LEVEL = 1  # as pipeline.core.images.encode_png for shards (which imports torch)


@dataclass(frozen=True)
class ShardTask:
    split_uri: str
    name: str  # `<prefix>-000003.tar`
    items: tuple[tuple[str, str, int, str, str], ...]  # (key, path, label, path relative to the input, class name)
    image_size: int
    channels: int
    max_pixels: int
    keep_jpeg: bool
    options: StorageOptions | None = None

    @property
    def stats_name(self) -> str:
        return stats_name(self.name)

    def fingerprint(self) -> str:
        settings = {field: value for field, value in asdict(self).items() if field not in ("split_uri", "options")}
        settings["writer"] = STATS_FORMAT
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def stats_name(shard: str) -> str:
    return shard.removesuffix(".tar") + STATS_SUFFIX


def finished_stats(task: ShardTask) -> dict[str, Any] | None:
    """The stats of this task's shard when an earlier run finished it with the same inputs, else None."""
    stats_uri = join_uri(task.split_uri, task.stats_name)
    if not exists(stats_uri, task.options):
        return None
    try:
        stats = json.loads(read_bytes(stats_uri, task.options))
    except (ValueError, StorageError):
        return None
    if not isinstance(stats, dict) or stats.get("format") != STATS_FORMAT \
            or stats.get("fingerprint") != task.fingerprint():
        return None
    if stats.get("samples", 0) == 0:
        return stats  # every image refused: no tar to find
    shard_uri = join_uri(task.split_uri, task.name)
    if not exists(shard_uri, task.options) or file_size(shard_uri, task.options) != stats.get("bytes"):
        return None
    return stats


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _MEMBER_TIME, 0o444
    info.uname = info.gname = "bigdata"  # webdataset's TarWriter defaults
    archive.addfile(info, io.BytesIO(data))


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Write (or keep, when finished) one shard and its stats file; returns the stats (+ `skipped`)."""
    done = finished_stats(task)
    if done is not None:
        return {**done, "skipped": True}
    started = time.time()
    shard_uri = join_uri(task.split_uri, task.name)
    stream = StagedOutput(shard_uri, task.options)
    samples, kept_jpeg = 0, 0
    refused: list[str] = []
    reasons: dict[str, int] = {}
    try:
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as archive:
            for key, path, label, relative, class_name in task.items:
                image, refusal = image_folder.read_image_or_refusal(path, task.image_size, task.channels,
                                                                    task.max_pixels, keep_jpeg=task.keep_jpeg)
                if refusal is not None:
                    refused.append(path)
                    reasons[refusal.reason] = reasons.get(refusal.reason, 0) + 1
                    continue
                if isinstance(image, bytes):
                    _add(archive, f"{key}.jpg", image)
                    kept_jpeg += 1
                else:
                    _add(archive, f"{key}.png", _png(image))
                _add(archive, f"{key}.cls", str(int(label)).encode())
                metadata = {"source": "folder", "path": relative, "class": class_name}
                _add(archive, f"{key}.json", json.dumps(metadata, sort_keys=True).encode())
                samples += 1
        size = stream.tell()
        if samples:
            stream.close()  # publishes the tar
        else:
            stream.discard()
            remove(shard_uri, task.options)  # a stale tar of another plan must not look like this one
    except BaseException:
        stream.discard()
        raise
    stats = {"format": STATS_FORMAT, "name": task.name, "fingerprint": task.fingerprint(), "samples": samples,
             "bytes": size if samples else 0, "kept_jpeg": kept_jpeg, "refused": refused, "refused_reasons": reasons,
             "seconds": round(time.time() - started, 3)}
    write_bytes_atomic(join_uri(task.split_uri, task.stats_name), json.dumps(stats, indent=1).encode(), task.options)
    return {**stats, "skipped": False}
