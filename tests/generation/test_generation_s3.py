"""A tiny model generates a labeled set to S3 (moto) through the Ray Data actor pool; readers agree on it.

duckdb reads the Parquet files from a local copy: its httpfs extension is downloaded at run time,
which this offline machine cannot do, so the objects are fetched with the fsspec filesystem first.
"""

from __future__ import annotations

import io
import json

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.core.configuration import load_config
from pipeline.core.exports import load_tokenizer, load_var, save_tokenizer, save_var
from pipeline.core.images import encode_png
from pipeline.core.storage import fsspec_filesystem, pyarrow_filesystem
from pipeline.data.shards import read_index
from pipeline.generation.config import GenerateConfig
from pipeline.generation.job import prepare, run_generation
from pipeline.generation.schema import METADATA_KEY, SCHEMA
from pipeline.generation.worker import generate_images
from var_model import SamplingSettings

PLAN = {"class1": 5, "class4": 3, "9": 4}  # 12 images in units of 5 -> 3 files


def generate_config(tokenizer: str, var: str, output: str, **extra: str) -> GenerateConfig:
    overrides = [f"model.tokenizer={tokenizer}", f"model.var={var}", f"output.uri={output}",
                 "plan.classes=" + json.dumps(PLAN), "plan.unit_size=5", "plan.seed=3",
                 "sampling.batch_size=4", "compute.num_cpus=0.5", "compute.concurrency=2",
                 *(f"{k}={v}" for k, v in extra.items())]
    return load_config(GenerateConfig, None, overrides)


@pytest.fixture
def s3_exports(s3_bucket, tiny_exports) -> tuple[str, str]:
    """The tiny exports copied into the bucket: workers read the models from S3 too."""
    tokenizer_uri, var_uri = f"{s3_bucket}/models/tokenizer", f"{s3_bucket}/models/var"
    save_tokenizer(load_tokenizer(tiny_exports[0]), tokenizer_uri)
    save_var(load_var(tiny_exports[1]), var_uri, extra={"class_names": [f"class{i}" for i in range(10)]})
    return tokenizer_uri, var_uri


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.timeout(240)
def test_generated_set_on_s3_reads_everywhere(ray_cluster, s3_bucket, s3_exports, tiny_exports, tmp_path):
    output = f"{s3_bucket}/sets/v1"
    config = generate_config(*s3_exports, output, **{"output.webdataset": "true"})
    prepared = prepare(config)
    planned = {(key, label, seed) for unit in prepared.units for key, label, seed in
               zip(unit.keys, unit.labels, unit.seeds)}
    summary = run_generation(config, prepared, show_progress=False)
    assert summary["images_generated"] == 12 and summary["units"] == 3

    fs, root = fsspec_filesystem(output)
    names = sorted(path.split(f"{root}/", 1)[1] for path in fs.find(root))
    assert names == ["data/part-000000.parquet", "data/part-000001.parquet", "data/part-000002.parquet",
                     "plan.json", "stats/part-000000.json", "stats/part-000001.json", "stats/part-000002.json",
                     "webdataset/index.json", "webdataset/part-000000.tar", "webdataset/part-000001.tar",
                     "webdataset/part-000002.tar"]

    # pyarrow, straight from S3 through the project's filesystem (endpoint from AWS_ENDPOINT_URL).
    arrow_fs, data_path = pyarrow_filesystem(f"{output}/data")
    table = pq.read_table(data_path, filesystem=arrow_fs)
    assert table.schema.remove_metadata() == SCHEMA
    info = json.loads(table.schema.metadata[METADATA_KEY])
    assert info["format"] == "varray.generated/1" and info["scales"] == [1, 2, 4]
    assert info["var_checksum"] == prepared.models.var_checksum
    assert info["sampling"] == {"cfg": 1.5, "top_k": 900, "top_p": 0.96, "unguided_last_scales": 0,
                                "pruned_last_scales": 0, "prune_keep": 0.5}

    # pandas, from S3 via the same filesystem.
    frame = pd.read_parquet(data_path, filesystem=arrow_fs)
    assert {(k, int(l), int(s)) for k, l, s in zip(frame.key, frame.label, frame.seed)} == planned
    assert frame.key.is_unique
    assert set(frame.class_name) == {"class1", "class4", "class9"}
    assert (frame.tokenizer_checksum == prepared.models.tokenizer_checksum).all()
    for png, width, height in zip(frame.image, frame.width, frame.height):
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG" and image.mode == "L" and image.size == (width, height) == (16, 16)

    # duckdb, on a local copy of the objects (see the module docstring).
    fs.get(f"{root}/data/", str(tmp_path / "data"), recursive=True)
    counts = dict(duckdb.sql(f"select class_name, count(*) from read_parquet('{tmp_path}/data/*.parquet') "
                             "group by class_name").fetchall())
    assert counts == {"class1": 5, "class4": 3, "class9": 4}

    # The WebDataset copy holds the same samples and a pipeline.data.shards index.
    index = read_index(f"{output}/webdataset")
    assert index.total == 12 and index.image_size == 16 and index.class_names[9] == "class9"

    # Same (label, seed), same batch cut -> byte-identical PNGs, here generated again in this process.
    tokenizer, var = load_tokenizer(tiny_exports[0]), load_var(tiny_exports[1])
    torch.set_num_threads(1)
    first = frame[frame.key.isin(prepared.units[0].keys)].sort_values("key")
    again = generate_images(var, tokenizer, prepared.units[0].labels, prepared.units[0].seeds,
                            SamplingSettings(), batch_size=4)
    assert [encode_png(image) for image in again] == list(first.image)

    # A second run finds every unit done and generates nothing.
    rerun = run_generation(config, show_progress=False)
    assert rerun["units_generated"] == 0 and rerun["images_generated"] == 0


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_same_plan_gives_byte_identical_pngs(ray_cluster, tiny_exports, tmp_path):
    """Two runs of one plan into two folders, one and two actors: the same PNG bytes for every key."""
    first = generate_config(*tiny_exports, str(tmp_path / "a"), **{"compute.concurrency": "1"})
    second = generate_config(*tiny_exports, str(tmp_path / "b"), **{"compute.concurrency": "2"})
    run_generation(first, show_progress=False)
    run_generation(second, show_progress=False)
    a = pd.read_parquet(tmp_path / "a" / "data").set_index("key").sort_index()
    b = pd.read_parquet(tmp_path / "b" / "data").set_index("key").sort_index()
    assert list(a.index) == list(b.index) and len(a) == 12
    assert list(a.image) == list(b.image)
    # ... and not trivially so: different seeds give different images.
    pixels = [np.asarray(Image.open(io.BytesIO(png))) for png in a.image]
    assert len({p.tobytes() for p in pixels}) > 1
