"""WebDataset's sample grouping, read from a tar stream with the standard library's tarfile.

A sample is the run of consecutive tar members that share a key: the member's path up to the first
dot of its file name (`a/b/000012.png` and `a/b/000012.cls` are sample `a/b/000012`, entries `png`
and `cls`). This is webdataset's `base_plus_ext` rule; suffixes are lower-cased as webdataset does.
Written here so the reader depends on Ray's public datasource API only, not on Ray's private copy.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Collection, Iterator
from typing import IO, Any


def split_member_name(name: str) -> tuple[str, str] | None:
    """`dir/stem.ext.more` -> (`dir/stem`, `ext.more`); None for a name without a suffix."""
    directory, base = posixpath.split(name)
    stem, dot, suffix = base.partition(".")
    if not dot or not stem:
        return None
    return posixpath.join(directory, stem) if directory else stem, suffix.lower()


def iter_tar_samples(stream: IO[bytes], suffixes: Collection[str] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of a tar stream in archive order: {"__key__": key, suffix: bytes, ...}, holding only the
    `suffixes` asked for (None: all; a sample with none of them still comes, so the reader can report it). A suffix met twice for one key is a damaged shard (ValueError),
    as are tarfile's own errors, which propagate to the caller."""
    key, sample = None, None
    with tarfile.open(fileobj=stream, mode="r|*") as archive:
        for member in archive:
            if not member.isfile():
                continue
            parts = split_member_name(member.name)
            if parts is None:
                continue
            member_key, suffix = parts
            if member_key.startswith("__") and member_key.endswith("__"):
                continue  # webdataset's convention for archive-level metadata members
            if member_key != key:
                if sample is not None:
                    yield sample
                key, sample = member_key, {"__key__": member_key}
            if suffixes is not None and suffix not in suffixes:
                continue
            if suffix in sample:
                raise ValueError(f"duplicate file {suffix!r} for sample {member_key!r} (keys out of order?)")
            sample[suffix] = archive.extractfile(member).read()
    if sample is not None:
        yield sample
