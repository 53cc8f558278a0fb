"""The token cache: round trip, Parquet schema and metadata, refusal of a foreign tokenizer, reruns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.core.exports import load_tokenizer, read_export_info
from pipeline.data.reader import ImageDataConfig, image_dataset
from pipeline.token_cache.cache import precompute_token_cache, read_token_cache, split_tokens
from pipeline.token_cache.schema import TokenCacheError, token_dtype
from tests.chain.conftest import make_tokenizer_export

SCALES = (1, 2, 4)  # the tiny tokenizer's
CODEBOOK = 64


@pytest.fixture(scope="module")
def cache(ray_cluster, tiny_shards, tiny_tokenizer, tmp_path_factory) -> dict:
    output = str(tmp_path_factory.mktemp("cache") / "tokens")
    data = ImageDataConfig(shards_uri=tiny_shards, decode_batch_size=32)
    manifest = precompute_token_cache(tiny_tokenizer, data, output, batch_size=40, concurrency=2,
                                      flip_augmentation=True, num_cpus=0.5)
    return {"uri": output, "manifest": manifest, "data": data}


def _rows(dataset) -> dict[str, dict]:
    return {row["key"]: row for row in dataset.take_all()}


@pytest.mark.timeout(240)
def test_cached_tokens_decode_like_fresh_encoding(cache, tiny_tokenizer):
    tokenizer = load_tokenizer(tiny_tokenizer)
    cached = _rows(read_token_cache(cache["uri"], tokenizer.checksum, SCALES, CODEBOOK))
    fresh = _rows(image_dataset(cache["data"].model_copy(update={"shuffle": False})))
    assert sorted(cached) == sorted(fresh) and len(cached) == 96 == cache["manifest"]["num_rows"]

    keys = sorted(fresh)
    images = torch.from_numpy(np.stack([fresh[k]["image"] for k in keys]))
    tokens = torch.from_numpy(np.stack([cached[k]["tokens"] for k in keys]))
    assert tokens.dtype == torch.int64 and tokens.shape == (96, sum(s * s for s in SCALES))
    assert [cached[k]["label"] for k in keys] == [fresh[k]["label"] for k in keys]
    with torch.inference_mode():
        fresh_maps = tokenizer.encode_tokens(images)
        cached_maps = split_tokens(tokens, SCALES)
        for fresh_map, cached_map in zip(fresh_maps, cached_maps):
            assert torch.equal(fresh_map, cached_map)
        decoded_cached = tokenizer.decode_tokens(cached_maps)
        decoded_fresh = tokenizer.decode_tokens(fresh_maps)
    assert torch.allclose(decoded_cached, decoded_fresh, atol=1e-6)
    # Not a trivial pass: different tokens decode to different images.
    assert not torch.allclose(decoded_cached[0], decoded_cached[1])


@pytest.mark.timeout(120)
def test_parquet_files_carry_schema_and_provenance(cache, tiny_tokenizer):
    files = sorted(Path(cache["uri"], "data").glob("*.parquet"))
    assert [f.name for f in files] == [entry["name"] for entry in cache["manifest"]["files"]]
    schema = pq.read_schema(files[0])
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert meta["varray.format"] == "varray.token_cache/1"
    assert meta["varray.tokenizer_checksum"] == read_export_info(tiny_tokenizer)["checksum"]
    assert json.loads(meta["varray.scales"]) == list(SCALES)
    assert meta["varray.codebook_size"] == str(CODEBOOK) and meta["varray.flipped"] == "true"
    assert str(schema.field("key").type) == "string" and str(schema.field("label").type) == "int64"
    for side in SCALES:
        for name in (f"tokens_{side}", f"flipped_tokens_{side}"):
            field_type = schema.field(name).type
            assert field_type.list_size == side * side and str(field_type.value_type) == "uint8"
    table = pq.read_table(files[0])
    assert table.column("tokens_4").combine_chunks().flatten().to_numpy().max() < CODEBOOK


def test_token_dtype_is_the_smallest_that_holds_the_codebook():
    assert [token_dtype(n).name for n in (2, 256, 257, 4096, 65536, 65537)] == \
        ["uint8", "uint8", "uint16", "uint16", "uint16", "uint32"]


@pytest.mark.timeout(120)
def test_flipped_token_set_is_the_flipped_images_tokens(cache, tiny_tokenizer):
    tokenizer = load_tokenizer(tiny_tokenizer)
    table = pq.read_table(sorted(Path(cache["uri"], "data").glob("*.parquet"))[0])
    keys = table.column("key").to_pylist()[:8]
    fresh = _rows(image_dataset(cache["data"].model_copy(update={"shuffle": False})))
    images = torch.from_numpy(np.stack([fresh[k]["image"] for k in keys]))
    with torch.inference_mode():
        flipped_maps = tokenizer.encode_tokens(torch.flip(images, dims=[-1]))
    stored = table.column("flipped_tokens_4").combine_chunks().flatten().to_numpy().reshape(-1, 4, 4)[:8]
    assert np.array_equal(stored, flipped_maps[-1].numpy())
    # Reading with flip_probability 1 yields the flipped set in the concatenated `tokens` column.
    flipped_rows = _rows(read_token_cache(cache["uri"], tokenizer.checksum, SCALES, CODEBOOK, flip_probability=1.0))
    assert np.array_equal(flipped_rows[keys[0]]["tokens"][-16:], flipped_maps[-1][0].reshape(-1).numpy())


@pytest.mark.timeout(120)
def test_cache_of_another_tokenizer_is_refused(cache, tmp_path):
    other = make_tokenizer_export(tmp_path / "other", seed=1)
    other_checksum = read_export_info(other)["checksum"]
    with pytest.raises(TokenCacheError, match="not by the expected tokenizer") as error:
        read_token_cache(cache["uri"], other_checksum, SCALES, CODEBOOK)
    assert "\n" not in str(error.value)
    with pytest.raises(TokenCacheError, match="scales"):
        read_token_cache(cache["uri"], cache["manifest"]["tokenizer_checksum"], (1, 2, 3), CODEBOOK)
    # Writing over it with another tokenizer is refused too, rather than mixing two tokenizers' files.
    with pytest.raises(TokenCacheError, match="not by the expected tokenizer"):
        precompute_token_cache(other, cache["data"], cache["uri"], batch_size=40, concurrency=1, num_cpus=0.5)


@pytest.mark.timeout(120)
def test_incomplete_cache_is_refused_and_a_complete_one_is_not_rewritten(cache, tiny_tokenizer, tmp_path):
    with pytest.raises(TokenCacheError, match="no complete token cache"):
        read_token_cache(str(tmp_path), "0" * 64, SCALES, CODEBOOK)
    files_before = {p: p.stat().st_mtime_ns for p in Path(cache["uri"]).rglob("*")}
    again = precompute_token_cache(tiny_tokenizer, cache["data"], cache["uri"], batch_size=40, concurrency=1,
                                   flip_augmentation=True, num_cpus=0.5)
    assert again == cache["manifest"]
    assert {p: p.stat().st_mtime_ns for p in Path(cache["uri"]).rglob("*")} == files_before


@pytest.mark.timeout(180)
def test_cache_on_s3_round_trips_like_the_local_one(cache, tiny_tokenizer, s3_bucket):
    uri = f"{s3_bucket}/caches/tiny"
    manifest = precompute_token_cache(tiny_tokenizer, cache["data"], uri, batch_size=48, concurrency=1, num_cpus=0.5)
    assert manifest["num_rows"] == 96 and manifest["flipped"] is False
    checksum = cache["manifest"]["tokenizer_checksum"]
    on_s3 = _rows(read_token_cache(uri, checksum, SCALES, CODEBOOK))
    local = _rows(read_token_cache(cache["uri"], checksum, SCALES, CODEBOOK))
    assert sorted(on_s3) == sorted(local)
    assert all(np.array_equal(on_s3[k]["tokens"], local[k]["tokens"]) for k in local)
    import boto3
    bucket = s3_bucket.removeprefix("s3://")
    names = sorted(o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"])
    # Published under deterministic names; nothing left of the staging prefix.
    assert [n for n in names if not n.endswith("/")] == ["caches/tiny/_SUCCESS.json",
                                                         "caches/tiny/data/part-00000.parquet"], names
    assert not any("_staging" in name for name in names), names


@pytest.mark.timeout(180)
def test_a_killed_runs_leftovers_are_replaced_not_added_to(cache, tiny_tokenizer, tmp_path):
    output = tmp_path / "tokens"
    # What a run killed mid-way leaves: a staged file and a published part, but no manifest.
    (output / "_staging-dead").mkdir(parents=True)
    (output / "_staging-dead" / "x_000000-0.parquet").write_bytes(b"half a file")
    (output / "data").mkdir()
    (output / "data" / "part-00003.parquet").write_bytes(b"from the killed run")
    manifest = precompute_token_cache(tiny_tokenizer, cache["data"], str(output), batch_size=48, concurrency=1,
                                      num_cpus=0.5)
    assert sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file()) == \
        ["_SUCCESS.json", "data/part-00000.parquet"]
    rows = _rows(read_token_cache(str(output), manifest["tokenizer_checksum"], SCALES, CODEBOOK))
    assert len(rows) == manifest["num_rows"] == 96
