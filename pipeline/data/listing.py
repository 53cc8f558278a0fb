"""The index of a split: its index.json, or, for WebDataset shards other tools wrote, one built by listing.

`load_index(split_uri, label_key=..., cache=...)` returns `<split_uri>/index.json` when there is one
(make_shards writes it). Otherwise it lists the split's `*.tar` files and reads each once (one
thread per shard, 8 at a time): the samples it holds (webdataset's grouping), the image size and
channels of the split's first image, and every label, either the `.cls` entry (ASCII digits) or,
with `label_key`, that field of the `.json` entry (an integer class id, or a class name). Integer
labels give classes "0".."max"; names give the sorted distinct names, class i being the i-th.

Cache: the built index is stored as JSON (the index.json format, `source.name: "listing"`) and
used again while the split's tar names and byte sizes and the label settings are those it was
built from; any change builds it again. Where: beside the shards, `<split_uri>/index.listed.json`,
so every job and worker reading the split finds it with no setting (and it moves with the data),
under a name of its own so it is never taken for make_shards' index.json. With `cache` (a folder),
it goes there instead, as `<split name>-<hash of URI and label settings>.json`: for shards in a
location the job may not write (a public bucket). A cache that cannot be written is logged and the
index used uncached.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
from PIL import Image

from pipeline.core.storage import StorageError, StorageOptions, exists, join_uri, pyarrow_filesystem, write_bytes_atomic
from pipeline.data.shards import INDEX_FILE, ShardIndex, ShardIndexError, ShardInfo, read_index, read_index_file
from pipeline.data.sources import image_folder
from pipeline.data.tar_samples import iter_tar_samples

logger = logging.getLogger(__name__)

LISTED_INDEX_FILE = "index.listed.json"
LISTING = "listing"  # source.name of an index built here
IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp")  # a sample's image: the first of these it holds


class ListingError(ShardIndexError):
    """Shards without index.json that cannot be indexed (no tars, no labels, mixed label kinds)."""


def image_entry(sample: dict[str, Any]) -> bytes | None:
    for suffix in IMAGE_SUFFIXES:
        if suffix in sample:
            return sample[suffix]
    return None


def label_from_json(raw: bytes, label_key: str) -> int | str:
    """The `label_key` field (dots walk into nested objects) of a sample's .json: an int or a name; ValueError why not."""
    try:
        value: Any = json.loads(raw)
    except ValueError:
        raise ValueError("label: .json entry is not JSON") from None
    for part in label_key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"missing label: no {label_key!r} in the .json entry")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise ValueError(f"label not an integer or a name: {str(value)[:20]!r} at {label_key!r}")
    return value


@dataclass
class _ShardListing:
    name: str
    bytes: int
    samples: int = 0
    first_image: tuple[int, int, int] | None = None  # width, height, channels
    ids: set[int] = field(default_factory=set)
    names: set[str] = field(default_factory=set)
    has_cls: bool = False
    has_json: bool = False


def _channels(image: Image.Image) -> int:
    try:
        return 1 if image_folder.to_gray_or_rgb(image).mode == "L" else 3
    except image_folder.ImageRefused:
        return 3


def _list_shard(fs: pafs.FileSystem, path: str, name: str, size: int, label_key: str | None) -> _ShardListing:
    listing = _ShardListing(name=name, bytes=size)
    wanted = (*IMAGE_SUFFIXES, "cls", "json")
    with fs.open_input_stream(path) as stream:
        for sample in iter_tar_samples(stream, wanted):
            listing.samples += 1
            listing.has_cls |= "cls" in sample
            listing.has_json |= "json" in sample
            raw = image_entry(sample)
            if listing.first_image is None and raw is not None:
                try:
                    with Image.open(io.BytesIO(raw)) as image:  # the header only
                        listing.first_image = (*image.size, _channels(image))
                except Exception:  # a bad first image: the next one tells; the reader reports this one
                    pass
            try:
                if label_key is not None and "json" in sample:
                    value = label_from_json(sample["json"], label_key)
                elif label_key is None and "cls" in sample:
                    value = int(sample["cls"].decode("utf-8", "replace").strip())
                else:
                    continue
            except ValueError:
                continue  # the reader skips (or fails on) this sample, naming it
            (listing.ids if isinstance(value, int) else listing.names).add(value)
    return listing


def _tars(split_uri: str, storage: StorageOptions | None) -> tuple[pafs.FileSystem, str, list[tuple[str, int]]]:
    fs, root = pyarrow_filesystem(split_uri, storage)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except (OSError, FileNotFoundError) as exc:
        raise StorageError(f"{split_uri}: {str(exc).splitlines()[0] if str(exc) else 'cannot be listed'}") from None
    tars = sorted((posixpath.basename(info.path), info.size) for info in infos
                  if info.type == pafs.FileType.File and info.path.endswith(".tar"))
    return fs, root.rstrip("/"), tars


def build_index(split_uri: str, label_key: str | None = None, storage: StorageOptions | None = None,
                tars: list[tuple[str, int]] | None = None) -> ShardIndex:
    """Read every tar of the split once and describe it as a ShardIndex (see the module doc)."""
    fs, root, listed = _tars(split_uri, storage)
    tars = listed if tars is None else tars
    if not tars:
        raise ListingError(f"{split_uri}: no {INDEX_FILE} and no .tar shards")
    with ThreadPoolExecutor(max_workers=min(8, len(tars))) as pool:
        shards = list(pool.map(lambda tar: _list_shard(fs, f"{root}/{tar[0]}", tar[0], tar[1], label_key), tars))
    first = next((shard.first_image for shard in shards if shard.first_image is not None), None)
    if first is None:
        raise ListingError(f"{split_uri}: no {'/'.join('.' + s for s in IMAGE_SUFFIXES)} image in its shards")
    ids = set().union(*(shard.ids for shard in shards))
    names = set().union(*(shard.names for shard in shards))
    if not ids and not names:
        if label_key is None and any(shard.has_json for shard in shards) and not any(s.has_cls for s in shards):
            raise ListingError(f"{split_uri}: its samples have no .cls label; set label_key to the .json field "
                               f"that holds the label")
        where = f"field {label_key!r} of .json" if label_key else ".cls"
        raise ListingError(f"{split_uri}: no sample has a label ({where})")
    if ids and names:
        raise ListingError(f"{split_uri}: labels at {label_key!r} are both integers ({min(ids)}, ...) and names "
                           f"({sorted(names)[0]!r}, ...); give one kind")
    class_names = sorted(names) if names else [str(i) for i in range(max(ids) + 1)]
    width, height, channels = first
    index = ShardIndex(
        split=posixpath.basename(split_uri.rstrip("/")) or "split",
        shards=[ShardInfo(name=shard.name, samples=shard.samples, bytes=shard.bytes) for shard in shards
                if shard.samples],
        total=sum(shard.samples for shard in shards), class_names=class_names, image_size=min(width, height),
        channels=channels,
        source={"name": LISTING, "label_key": label_key, "labels": "names" if names else "ids",
                "first_image": {"width": width, "height": height}})
    if not index.shards:
        raise ListingError(f"{split_uri}: its .tar shards hold no samples")
    return index


def listed_index_uri(split_uri: str, label_key: str | None, cache: str | None) -> str:
    if cache is None:
        return join_uri(split_uri, LISTED_INDEX_FILE)
    digest = hashlib.sha256(json.dumps([split_uri, label_key]).encode()).hexdigest()[:16]
    return join_uri(cache, f"{posixpath.basename(split_uri.rstrip('/')) or 'split'}-{digest}.json")


def _still_valid(cached: ShardIndex, label_key: str | None, tars: list[tuple[str, int]]) -> bool:
    listed = {name: size for name, size in tars}
    indexed = {shard.name: shard.bytes for shard in cached.shards}
    return (cached.source.get("name") == LISTING and cached.source.get("label_key") == label_key
            and all(listed.get(name) == size for name, size in indexed.items())
            and set(listed) - set(indexed) <= set(cached.source.get("empty_shards", [])))


_MEMO: dict[tuple[str, str | None, str | None, tuple], ShardIndex] = {}


def load_index(split_uri: str, storage: StorageOptions | None = None, label_key: str | None = None,
               cache: str | None = None) -> ShardIndex:
    """The split's index.json, else the (cached) index built by listing its tars."""
    if exists(join_uri(split_uri, INDEX_FILE), storage) or not exists(split_uri, storage):
        return read_index(split_uri, storage)  # a missing split: StorageError "<uri>/index.json: does not exist"
    _, _, tars = _tars(split_uri, storage)
    memo_key = (split_uri, label_key, cache, tuple(tars))
    if memo_key in _MEMO:
        return _MEMO[memo_key]
    cache_uri = listed_index_uri(split_uri, label_key, cache)
    index = None
    if exists(cache_uri, storage):
        try:
            cached = read_index_file(cache_uri, storage)
            index = cached if _still_valid(cached, label_key, tars) else None
        except ShardIndexError:
            index = None
        if index is None:
            logger.info("%s: the shards changed since %s was built; listing them again", split_uri, cache_uri)
    if index is None:
        logger.info("%s: no %s; listing its %d shards once", split_uri, INDEX_FILE, len(tars))
        index = build_index(split_uri, label_key, storage, tars)
        empty = sorted({name for name, _ in tars} - {shard.name for shard in index.shards})
        if empty:
            index = index.model_copy(update={"source": {**index.source, "empty_shards": empty}})
        try:
            write_bytes_atomic(cache_uri, index.model_dump_json(indent=2).encode(), storage)
        except StorageError as exc:
            logger.warning("could not cache the listed index at %s (%s); set the reader's index_cache to a "
                           "writable folder", cache_uri, exc)
    _MEMO[memo_key] = index
    return index
