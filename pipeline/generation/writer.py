"""Publish one work unit: optional WebDataset tar, then the Parquet file, then the stats JSON.

Every file is built in memory and published with one atomic write (local: temp file + rename;
S3: one PUT), so a reader or a rerun never sees half a file. The stats JSON goes last and is the
commit marker (img2dataset's rule): a unit without it is redone from scratch, and since a (label,
seed) pair always gives the same PNG, redoing it rewrites the same bytes. The stats JSON records
each file's size and sha256: a rerun counts the unit as done only when the files still match.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from pipeline.core.storage import join_uri, write_bytes_atomic
from pipeline.data.shards import check_key
from pipeline.generation.plan import WorkUnit
from pipeline.generation.schema import GENERATED_FORMAT, data_file, schema_with_metadata, stats_file, webdataset_file
from var_model import SamplingSettings


@dataclass(frozen=True)
class SetContext:
    """What every row and file of one generated set shares."""

    output_uri: str
    class_names: tuple[str, ...]
    tokenizer_checksum: str
    var_checksum: str
    sampling: SamplingSettings
    plan_fingerprint: str
    metadata: dict[str, Any]  # scales, codebook size, image size, channels, ...
    webdataset: bool = False


def parquet_bytes(unit: WorkUnit, pngs: Sequence[bytes], sizes: Sequence[tuple[int, int]],
                  context: SetContext) -> bytes:
    count = len(unit)
    columns = {
        "key": list(unit.keys),
        "label": list(unit.labels),
        "class_name": [context.class_names[label] for label in unit.labels],
        "seed": list(unit.seeds),
        "image": list(pngs),
        "width": [width for width, _ in sizes],
        "height": [height for _, height in sizes],
        "tokenizer_checksum": [context.tokenizer_checksum] * count,
        "var_checksum": [context.var_checksum] * count,
        "cfg": [float(context.sampling.cfg)] * count,
        "top_k": [int(context.sampling.top_k)] * count,
        "top_p": [float(context.sampling.top_p)] * count,
    }
    schema = schema_with_metadata({
        **context.metadata, "unit": unit.name, "plan_fingerprint": context.plan_fingerprint,
        "tokenizer_checksum": context.tokenizer_checksum, "var_checksum": context.var_checksum,
        "class_names": list(context.class_names),
        "sampling": context.sampling.as_kwargs(),
    })
    table = pa.Table.from_pydict(columns, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")  # PNG bytes hardly compress; the other columns do
    return sink.getvalue().to_pybytes()


def tar_bytes(unit: WorkUnit, pngs: Sequence[bytes], context: SetContext) -> bytes:
    """The unit as one WebDataset shard (pipeline.data.shards layout: <key>.png, .cls, .json)."""
    buffer = io.BytesIO()
    # mtime fixed: the same unit gives the same tar bytes.
    with wds.TarWriter(buffer, encoder=False, mtime=0) as writer:
        for key, label, seed, png in zip(unit.keys, unit.labels, unit.seeds, pngs):
            writer.write({
                "__key__": check_key(key),
                "png": png,
                "cls": str(int(label)).encode(),
                "json": json.dumps({"source": "generated", "seed": seed, "class": context.class_names[label],
                                    "var_checksum": context.var_checksum}, sort_keys=True).encode(),
            })
    return buffer.getvalue()


def publish_unit(unit: WorkUnit, images: np.ndarray, pngs: Sequence[bytes], context: SetContext,
                 seconds: float) -> dict[str, Any]:
    """Write the unit's files in commit order and return its stats (also written as the stats JSON)."""
    height, width = images.shape[1:3]
    stats: dict[str, Any] = {"format": GENERATED_FORMAT, "unit": unit.name, "count": len(unit),
                             "first_key": unit.keys[0], "last_key": unit.keys[-1],
                             "labels": {str(k): int(v) for k, v in zip(*np.unique(unit.labels, return_counts=True))},
                             "plan_fingerprint": context.plan_fingerprint}
    if context.webdataset:
        shard = tar_bytes(unit, pngs, context)
        write_bytes_atomic(join_uri(context.output_uri, webdataset_file(unit.name)), shard)
        stats["webdataset"] = {"file": webdataset_file(unit.name), "bytes": len(shard),
                               "sha256": hashlib.sha256(shard).hexdigest()}
    data = parquet_bytes(unit, pngs, [(width, height)] * len(unit), context)
    write_bytes_atomic(join_uri(context.output_uri, data_file(unit.name)), data)
    stats.update({"file": data_file(unit.name), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                  "generation_seconds": round(seconds, 3),
                  "images_per_second": round(len(unit) / seconds, 3) if seconds > 0 else None,
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "finished_unix": round(time.time(), 3)})
    # Last: its presence says the unit is complete.
    write_bytes_atomic(join_uri(context.output_uri, stats_file(unit.name)), json.dumps(stats, indent=2).encode())
    return stats
