"""The generated-set format `varray.generated/1`: one Parquet file per work unit plus its stats JSON.

    <output>/plan.json                    the plan's description and fingerprint (written before any unit)
    <output>/data/part-000000.parquet     the samples of unit part-000000
    <output>/stats/part-000000.json       written after the Parquet file: its presence marks the unit done
    <output>/webdataset/part-000000.tar   optional: the same samples as <key>.png / .cls / .json
    <output>/webdataset/index.json        optional: written once every unit is done (pipeline.data.shards format)

Parquet columns (one row per image):
    key                 string   c<label:04d>_<index:07d>, unique in the set
    label               int64    class index
    class_name          string
    seed                int64    the sample's own generator seed
    image               binary   PNG bytes (mode L for 1 channel, RGB for 3)
    width, height       int32
    tokenizer_checksum  string   sha256 of the tokenizer export's weights
    var_checksum        string   sha256 of the VAR export's weights
    cfg                 float64  classifier-free guidance
    top_k               int32
    top_p               float64
File metadata key `varray.generated` holds JSON: format, unit, plan fingerprint, both checksums,
scales, codebook size, image size, channels, class names, sampling parameters.

Stats file `stats/<unit>.json` (one JSON object, written last):
    format, unit, count, first_key, last_key, labels {label: count}
    plan_fingerprint    the plan.json fingerprint the unit was made for
    file, bytes, sha256 the Parquet file (relative to the set), its size and sha256 (hex)
    webdataset          only with the tar: {file, bytes, sha256} of webdataset/<unit>.tar
    generation_seconds, images_per_second, finished_at (UTC ISO 8601), finished_unix
A rerun counts a unit as done only when its stats file names the plan's fingerprint and every file
it records exists with that size and sha256; otherwise the unit is made again (same bytes). An
output folder without plan.json must be empty: a job never writes into someone else's folder.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pipeline.core.errors import VarrayError

GENERATED_FORMAT = "varray.generated/1"
METADATA_KEY = b"varray.generated"
PLAN_FILE = "plan.json"
DATA_DIR = "data"
STATS_DIR = "stats"
WEBDATASET_DIR = "webdataset"

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("label", pa.int64()),
    ("class_name", pa.string()),
    ("seed", pa.int64()),
    ("image", pa.binary()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("tokenizer_checksum", pa.string()),
    ("var_checksum", pa.string()),
    ("cfg", pa.float64()),
    ("top_k", pa.int32()),
    ("top_p", pa.float64()),
])


class GeneratedSetError(VarrayError, ValueError):
    """A generated set is missing, unfinished or damaged; one line naming the file."""


def data_file(unit: str) -> str:
    return f"{DATA_DIR}/{unit}.parquet"


def stats_file(unit: str) -> str:
    return f"{STATS_DIR}/{unit}.json"


def webdataset_file(unit: str) -> str:
    return f"{WEBDATASET_DIR}/{unit}.tar"


def schema_with_metadata(metadata: dict[str, Any]) -> pa.Schema:
    return SCHEMA.with_metadata({METADATA_KEY: json.dumps({"format": GENERATED_FORMAT, **metadata},
                                                          sort_keys=True).encode()})


def read_metadata(schema: pa.Schema, where: str) -> dict[str, Any]:
    """The `varray.generated` metadata of a file's schema; a ValueError naming the file if absent."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{where}: no {METADATA_KEY.decode()} metadata: not a generated-set file")
    info = json.loads(raw)
    if info.get("format") != GENERATED_FORMAT:
        raise ValueError(f"{where}: format {info.get('format')!r}, expected {GENERATED_FORMAT!r}")
    return info
