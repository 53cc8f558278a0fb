"""Read a generated set back: every published unit's rows, checked against its stats JSON marker
(the Parquet file must have the size the stats file records; a damaged set is a GeneratedSetError)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.images import decode_png
from pipeline.core.storage import exists, join_uri, list_files, pyarrow_filesystem, read_bytes
from pipeline.generation.schema import DATA_DIR, PLAN_FILE, STATS_DIR, GeneratedSetError, read_metadata


@dataclass
class GeneratedSet:
    keys: np.ndarray  # str [N]
    labels: np.ndarray  # int64 [N]
    seeds: np.ndarray  # int64 [N]
    images: np.ndarray  # uint8 [N,H,W] or [N,H,W,3]
    class_names: list[str]
    metadata: dict[str, Any]  # the file metadata of the first unit (checksums, sampling, scales, ...)
    plan: dict[str, Any]


def iter_generated_units(uri: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The rows of each committed unit (those with a stats JSON), one table per unit, in unit order:
    a whole set never has to be in memory at once."""
    if not exists(join_uri(uri, PLAN_FILE)):
        raise GeneratedSetError(f"{uri}: no {PLAN_FILE}: not a generated set")
    markers = list_files(join_uri(uri, STATS_DIR), ".json")
    committed = [name.replace("\\", "/").rsplit("/", 1)[-1].removesuffix(".json") for name in markers]
    if not committed:
        raise GeneratedSetError(f"{uri}: no finished unit yet")
    fs, root = pyarrow_filesystem(join_uri(uri, DATA_DIR))
    for unit, marker in sorted(zip(committed, markers)):
        path = f"{root}/{unit}.parquet"
        try:
            recorded = json.loads(read_bytes(marker)).get("bytes")
        except (ValueError, AttributeError):
            raise GeneratedSetError(f"{marker}: damaged stats file (not a JSON object)") from None
        size = fs.get_file_info(path).size
        if size != recorded:
            found = "is missing" if size is None else f"has {size} bytes"
            raise GeneratedSetError(f"{uri}: unit {unit}'s Parquet file {found}, its stats file records {recorded}; "
                                    "run generate_dataset again to make it again")
        yield pq.read_table(path, filesystem=fs, columns=columns)


def read_generated_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """The rows of every committed unit (those with a stats JSON), in unit order."""
    return pa.concat_tables(list(iter_generated_units(uri, columns)))


def read_generated_set(uri: str) -> GeneratedSet:
    """Decode a whole set into arrays (meant for evaluation-sized sets, not billions of images)."""
    table = read_generated_table(uri, ["key", "label", "seed", "image"])
    metadata = read_metadata(table.schema, uri)
    images = np.stack([decode_png(png) for png in table.column("image").to_pylist()])
    plan = json.loads(read_bytes(join_uri(uri, PLAN_FILE)))
    return GeneratedSet(
        keys=np.asarray(table.column("key").to_pylist()), labels=table.column("label").to_numpy(),
        seeds=table.column("seed").to_numpy(), images=images, class_names=list(metadata["class_names"]),
        metadata=metadata, plan=plan)
