"""WebDataset shards: `<split_uri>/<prefix>-000000.tar` ... plus `<split_uri>/index.json`.

Each sample is `<key>.png` (uint8, 1 or 3 channels, image_size x image_size) or `<key>.jpg` (a
source JPEG kept as it was: already that size and mode), `<key>.cls` (the class index as ASCII
digits) and `<key>.json` (where it came from). Keys contain no dots: a
WebDataset reader splits the file name at the first dot. The index is written last, atomically:
its presence marks a complete split, and readers check each shard's size against it (a truncated
upload or copy shows up before any sample is read).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import webdataset as wds
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from pipeline.core.errors import VarrayError
from pipeline.core.images import encode_png
from pipeline.core.storage import StagedOutput, StorageOptions, join_uri, read_json_object, write_bytes_atomic

SHARD_FORMAT = "varray.shards/1"
INDEX_FILE = "index.json"


class ShardIndexError(VarrayError, ValueError):
    """An index.json that is not a valid shard index (not JSON, wrong shape, a shard outside its folder)."""


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str  # file name inside the split folder: never a path, '..', an absolute path or a URI
    samples: int
    bytes: int

    @field_validator("name")
    @classmethod
    def _inside_the_split_folder(cls, name: str) -> str:
        if (not name or name in (".", "..") or any(c in name for c in "/\\:\0")
                or posixpath.basename(name) != name):
            raise ValueError(f"shard name {name!r} is not a file name inside the split folder")
        return name


class ShardIndex(BaseModel):
    """The index.json of one split: what readers need without opening a shard."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["varray.shards/1"] = SHARD_FORMAT
    split: str
    shards: list[ShardInfo]
    total: int
    class_names: list[str]
    image_size: int
    channels: Literal[1, 3]
    source: dict[str, Any]

    @model_validator(mode="after")
    def _total_matches(self) -> ShardIndex:
        counted = sum(shard.samples for shard in self.shards)
        if counted != self.total:
            raise ValueError(f"total is {self.total} but the shards hold {counted} samples")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class Sample:
    """One image on its way into a shard."""

    key: str
    image: np.ndarray  # uint8 [H, W] or [H, W, 3]
    label: int
    metadata: dict[str, Any] = field(default_factory=dict)


def check_key(key: str) -> str:
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
    return key


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


def write_shards(samples: Iterable[Sample], split_uri: str, *, split: str, class_names: list[str],
                 image_size: int, channels: int, source: dict[str, Any], prefix: str = "shard",
                 samples_per_shard: int = 1000, options: StorageOptions | None = None) -> ShardIndex:
    """Write `samples` as WebDataset shards under `split_uri`, then its index.json; returns the index."""
    if "/" in prefix or "." in prefix or not prefix:
        raise ValueError(f"prefix {prefix!r} must be a plain name without '/' or '.'")
    expected_shape = (image_size, image_size) if channels == 1 else (image_size, image_size, 3)
    shards: list[ShardInfo] = []
    streams: dict[str, StagedOutput] = {}

    def opener(name: str) -> StagedOutput:
        streams[name] = StagedOutput(join_uri(split_uri, name), options)
        return streams[name]

    def finished(name: str) -> None:
        # TarWriter does not close a stream it did not open; closing it publishes the shard (local: the
        # staging file renamed, S3: the upload completed), a StorageError naming the shard if that fails.
        stream = streams[name]
        size = stream.tell()
        stream.close()
        del streams[name]
        shards.append(ShardInfo(name=posixpath.basename(name), samples=writer.count, bytes=size))

    iterator: Iterator[Sample] = iter(samples)
    first = next(iterator, None)
    if first is None:
        raise ValueError(f"{split_uri}: no samples to write for split {split!r}")
    writer = wds.ShardWriter(f"{prefix}-%06d.tar", maxcount=samples_per_shard, post=finished,
                             opener=opener, verbose=0, encoder=False)
    # No `with writer`: on an error it would close, i.e. publish, the half-written shard. Instead the
    # unfinished shard's staging file is discarded; shards already published stay (a rerun rewrites them).
    try:
        for sample in _chain(first, iterator):
            if sample.image.dtype != np.uint8 or sample.image.shape != expected_shape:
                raise ValueError(f"sample {sample.key}: image {sample.image.dtype} {sample.image.shape}, "
                                 f"expected uint8 {expected_shape}")
            if not 0 <= sample.label < len(class_names):
                raise ValueError(f"sample {sample.key}: label {sample.label} outside 0..{len(class_names) - 1}")
            writer.write({
                "__key__": check_key(sample.key),
                "png": encode_png(sample.image, compress_level=1),
                "cls": str(int(sample.label)).encode(),
                "json": json.dumps(sample.metadata, sort_keys=True).encode(),
            })
        writer.close()
    except BaseException:
        for stream in streams.values():
            stream.discard()
        raise
    index = ShardIndex(split=split, shards=shards, total=sum(s.samples for s in shards),
                       class_names=list(class_names), image_size=image_size, channels=channels, source=source)
    write_index(index, split_uri, options)
    return index


def _chain(first: Sample, rest: Iterator[Sample]) -> Iterator[Sample]:
    yield first
    yield from rest


def _validation_message(exc: ValidationError) -> str:
    """The first problem of a pydantic error in one line: `shards[2].name: shard name '../x' is ...`."""
    error = exc.errors()[0]
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    message = str(error["msg"]).removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {message}{more}" if where else f"{message}{more}"


def write_index(index: ShardIndex, split_uri: str, options: StorageOptions | None = None) -> None:
    write_bytes_atomic(join_uri(split_uri, INDEX_FILE), index.model_dump_json(indent=2).encode(), options)


def read_index(split_uri: str, options: StorageOptions | None = None) -> ShardIndex:
    """Parse and validate `<split_uri>/index.json`; errors name the file."""
    return read_index_file(join_uri(split_uri, INDEX_FILE), options)


def read_index_file(uri: str, options: StorageOptions | None = None) -> ShardIndex:
    """Parse and validate a shard index stored at `uri` (index.json, or a cached listing's index)."""
    data = read_json_object(uri, "a valid shard index", ShardIndexError, options)  # StorageError if unreadable
    try:
        return ShardIndex.model_validate(data)
    except ValidationError as exc:
        raise ShardIndexError(f"{uri}: not a valid shard index: {_validation_message(exc)}") from None


def shard_uris(index: ShardIndex, split_uri: str) -> list[str]:
    return [join_uri(split_uri, shard.name) for shard in index.shards]
