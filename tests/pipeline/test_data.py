"""The Ray Data reader: exact round trips from a folder and from S3, worker splits, bad data."""

from __future__ import annotations

import logging
import os
import re
import tarfile
import threading

import numpy as np
import pytest
import torch
import webdataset as wds

from pipeline.core.storage import StorageError, StorageOptions, fsspec_filesystem, join_uri
from pipeline.data.bad_samples import BadSampleError, find_bad_sample_error
from pipeline.data.reader import ImageDataConfig, bad_sample_summary, image_dataset, torch_batches
from pipeline.data.sharding import MakeShardsConfig, make_shards
from pipeline.data.shards import ShardIndex, ShardInfo, read_index, write_index
from pipeline.data.sources.fashion_mnist import load_fashion_mnist
from tests.pipeline.shard_helpers import make_rgb_folder, png_bytes

pytestmark = pytest.mark.ray


def _pixels(image: np.ndarray) -> np.ndarray:
    """float [-1, 1] CHW back to uint8 HWC (exact for values that came from uint8)."""
    return np.rint((image + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0)


def _rows_by_key(dataset) -> dict[str, dict]:
    return {row["key"]: row for row in dataset.take_all()}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_fashion_mnist_round_trip_is_exact(where, ray_cluster, tmp_path, fashion_mnist_dir, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket") + "/fm"
    make_shards(MakeShardsConfig(source="fashion-mnist", input=fashion_mnist_dir, output=root, splits=["test"],
                                 limit=200, samples_per_shard=64))
    config = ImageDataConfig(shards_uri=join_uri(root, "test"), seed=1)
    index = read_index(config.shards_uri)
    assert index.total == 200 and [s.samples for s in index.shards] == [64, 64, 64, 8]
    rows = _rows_by_key(image_dataset(config))
    images, labels = load_fashion_mnist("test", fashion_mnist_dir)
    assert len(rows) == index.total
    for key, row in rows.items():
        original = int(key.rsplit("_", 1)[1])
        assert row["image"].dtype == np.float32 and row["image"].shape == (1, 28, 28)
        assert -1.0 <= row["image"].min() and row["image"].max() <= 1.0
        assert row["label"] == labels[original]
        np.testing.assert_array_equal(_pixels(row["image"])[..., 0], images[original])
    assert bad_sample_summary(config).clean


@pytest.mark.timeout(120)
def test_rgb_folder_at_another_size(ray_cluster, tmp_path):
    folder = make_rgb_folder(tmp_path / "images")
    output = str(tmp_path / "shards")
    index = make_shards(MakeShardsConfig(source="folder", input=str(folder), output=output, image_size=32,
                                         samples_per_shard=5))["train"]
    split = os.path.join(output, "train")
    written = {s["__key__"]: s for s in wds.WebDataset(
        [os.path.join(split, s.name) for s in index.shards], shardshuffle=False).decode("rgb8")}
    rows = _rows_by_key(image_dataset(ImageDataConfig(shards_uri=split)))
    assert rows.keys() == written.keys() and len(rows) == 18
    for key, row in rows.items():
        assert row["image"].shape == (3, 32, 32) and row["label"] == int(written[key]["cls"])
        np.testing.assert_array_equal(_pixels(row["image"]), written[key]["png"])
    # Asked for another size and gray: converted in the reader.
    small = image_dataset(ImageDataConfig(shards_uri=split, image_size=16, channels=1)).take(4)
    assert all(row["image"].shape == (1, 16, 16) for row in small)


@pytest.mark.timeout(120)
def test_two_workers_split_every_epoch(ray_cluster, fmnist_shards):
    """Ray Train hands each worker `streaming_split(n, equal=True)` of the dataset: two consumers get
    disjoint parts that together are every sample, again in the next epoch."""
    config = ImageDataConfig(shards_uri=fmnist_shards, shuffle_buffer_size=64)
    workers = image_dataset(config).streaming_split(2, equal=True)
    every_key = {f"fmnist_train_{i:05d}" for i in range(60000)}
    orders = []
    for epoch in range(2):
        seen: dict[int, list[str]] = {0: [], 1: []}

        def consume(rank: int) -> None:
            for batch in torch_batches(workers[rank], config, batch_size=32, epoch=epoch):
                assert batch["image"].shape[1:] == (1, 28, 28) and batch["image"].dtype == torch.float32
                assert batch["label"].dtype == torch.int64 and len(batch["key"]) == len(batch["label"])
                seen[rank] += batch["key"]

        threads = [threading.Thread(target=consume, args=(rank,)) for rank in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=100)
        first, second = seen[0], seen[1]
        assert first and second and len(first) == len(set(first)) and len(second) == len(set(second))
        assert not set(first) & set(second)
        assert len(first) + len(second) == 300 and set(first) <= every_key
        orders.append(first + second)
    assert set(orders[0]) == set(orders[1]) and orders[0] != orders[1]  # reshuffled per epoch


# ---- bad data ---------------------------------------------------------------------------------

GOOD = np.full((28, 28), 7, dtype=np.uint8)
BAD_SAMPLES = {  # key -> (entries, the reason's kind)
    "bad_notimage": ({"png": b"GIF89a this is not a png", "cls": b"1"}, "not an image"),
    "bad_nolabel": ({"png": png_bytes(GOOD)}, "missing label"),
    "bad_textlabel": ({"png": png_bytes(GOOD), "cls": b"shoe"}, "label not an integer"),
    "bad_range": ({"png": png_bytes(GOOD), "cls": b"12"}, "label out of range"),
    "bad_rgb": ({"png": png_bytes(np.zeros((28, 28, 3), np.uint8)), "cls": b"2"}, "wrong channels"),
    "bad_size": ({"png": png_bytes(np.zeros((32, 32), np.uint8)), "cls": b"2"}, "wrong size"),
}


def _write_shard(path: str, samples: dict[str, dict]) -> int:
    with open(path, "wb") as stream:
        writer = wds.TarWriter(stream, encoder=False)
        for key, entries in samples.items():
            writer.write({"__key__": key, **entries})
        writer.close()
    return os.path.getsize(path)


def _overwrite_header(path: str, member: int, data: bytes) -> None:
    """Overwrite the tar header of the member-th file (each member here fits in one 512-byte block)."""
    offsets = [info.offset for info in tarfile.open(path).getmembers()]
    with open(path, "r+b") as f:
        f.seek(offsets[member])
        f.write(data)


def _cut_and_reindex(split: str, name: str, size: int) -> None:
    with open(os.path.join(split, name), "r+b") as f:
        f.truncate(size)
    index = read_index(split)
    for shard in index.shards:
        if shard.name == name:
            shard.bytes = size
    write_index(index, split)


def _good(prefix: str, count: int) -> dict[str, dict]:
    return {f"{prefix}_{i}": {"png": png_bytes(GOOD + i), "cls": str(i % 10).encode()} for i in range(count)}


def _bad_split(folder: str, samples_per_shard: dict[str, dict[str, dict]]) -> str:
    """A split whose index.json is right for the shards as written (damage comes after)."""
    os.makedirs(folder, exist_ok=True)
    shards = [ShardInfo(name=name, samples=len(samples), bytes=_write_shard(os.path.join(folder, name), samples))
              for name, samples in samples_per_shard.items()]
    write_index(ShardIndex(split="train", shards=shards, total=sum(s.samples for s in shards),
                           class_names=[str(i) for i in range(10)], image_size=28, channels=1,
                           source={"name": "test"}), folder)
    return folder


@pytest.mark.timeout(180)
def test_skip_counts_and_names_every_bad_sample_and_shard(ray_cluster, tmp_path, caplog):
    bad = {key: entries for key, (entries, _) in BAD_SAMPLES.items()}
    split = _bad_split(str(tmp_path / "bad"), {
        "mixed-000000.tar": {**_good("a", 5), **bad, **_good("b", 5)},
        "truncated-000001.tar": _good("t", 8),
        "empty-000002.tar": _good("e", 3),
        "missing-000003.tar": _good("m", 3),
        "fine-000004.tar": _good("f", 4),
        "zeroed-000005.tar": _good("z", 6),
        "garbled-000006.tar": _good("g", 6),
    })
    # Damage the size check cannot see: a zeroed member header reads as a clean end of the archive
    # (caught by the sample count); a shard cut mid-member whose index entry has the cut size (a
    # partial upload recorded as is) fails mid-read.
    _overwrite_header(os.path.join(split, "zeroed-000005.tar"), member=4, data=bytes(512))
    _cut_and_reindex(split, "garbled-000006.tar", 5 * 1024 + 100)
    with open(os.path.join(split, "truncated-000001.tar"), "r+b") as f:
        f.truncate(3000)  # mid-member: a partial upload
    open(os.path.join(split, "empty-000002.tar"), "wb").close()
    os.remove(os.path.join(split, "missing-000003.tar"))

    config = ImageDataConfig(shards_uri=split, on_bad_sample="skip")
    with caplog.at_level(logging.WARNING):
        dataset = image_dataset(config)
        keys = sorted(image_dataset(config).take_all() and [row["key"] for row in dataset.take_all()])
        summary = bad_sample_summary(config)
    # Every complete sample read before the damage is kept: the zeroed shard's first two (a sample
    # here is .png + .cls); the garbled shard breaks inside its first sample, so all 6 of it are
    # lost. What a shard lost is counted with it.
    assert keys == sorted([*_good("a", 5), *_good("b", 5), *_good("f", 4), *_good("z", 2)])
    assert summary.skipped_samples == len(BAD_SAMPLES)  # counted once over two passes
    assert (summary.skipped_shards, summary.samples_in_skipped_shards) == (5, 8 + 3 + 3 + 4 + 6)
    assert summary.by_reason == {"not an image": 1, "missing label": 1, "label not an integer": 1,
                                 "label out of range": 1, "wrong channels": 1, "wrong size": 1,
                                 "truncated or altered shard": 1, "empty shard": 1, "missing shard": 1,
                                 "shard sample count": 1, "unreadable shard": 1}
    culprits = {(os.path.basename(e["shard"]), e["key"]) for e in summary.examples}
    assert {("mixed-000000.tar", key) for key in BAD_SAMPLES} <= culprits
    log = caplog.text
    for name in ("truncated-000001.tar", "empty-000002.tar", "missing-000003.tar", "zeroed-000005.tar",
                 "garbled-000006.tar", *BAD_SAMPLES):
        assert name in log


@pytest.mark.timeout(180)
def test_fail_mode_names_shard_and_key(ray_cluster, tmp_path, s3_bucket):
    for key, (entries, kind) in BAD_SAMPLES.items():
        split = _bad_split(str(tmp_path / key), {"s-000000.tar": {**_good("ok", 3), key: entries}})
        with pytest.raises(Exception) as caught:
            image_dataset(ImageDataConfig(shards_uri=split, on_bad_sample="fail")).take_all()
        error = find_bad_sample_error(caught.value)
        assert error is not None, f"{key}: {caught.value}"
        message = str(error)
        assert "\n" not in message and f"key {key}: {kind}" in message
        assert os.path.join(split, "s-000000.tar") in message

    # On S3 the message names the s3:// URI of the shard.
    local = _bad_split(str(tmp_path / "s3copy"), {"s-000000.tar": {**_good("ok", 3), "bad_range": BAD_SAMPLES[
        "bad_range"][0]}})
    fs, root = fsspec_filesystem(s3_bucket)
    for name in ("s-000000.tar", "index.json"):
        fs.put_file(os.path.join(local, name), f"{root}/bad/{name}")
    with pytest.raises(Exception) as caught:
        image_dataset(ImageDataConfig(shards_uri=f"{s3_bucket}/bad", on_bad_sample="fail")).take_all()
    assert str(find_bad_sample_error(caught.value)).startswith(
        f"bad sample: shard {s3_bucket}/bad/s-000000.tar key bad_range: label out of range")

    split = _bad_split(str(tmp_path / "garbled"), {"s-000000.tar": _good("x", 4)})
    _cut_and_reindex(split, "s-000000.tar", 3 * 1024 + 100)
    with pytest.raises(Exception) as caught:
        image_dataset(ImageDataConfig(shards_uri=split, on_bad_sample="fail")).take_all()
    assert re.fullmatch(r"bad sample: shard .*garbled/s-000000.tar: unreadable shard: .*",
                        str(find_bad_sample_error(caught.value)))

    split = _bad_split(str(tmp_path / "short"), {"s-000000.tar": _good("x", 4)})
    with open(os.path.join(split, "s-000000.tar"), "r+b") as f:
        f.truncate(1024)
    with pytest.raises(BadSampleError, match=r"shard .*short/s-000000.tar: truncated or altered shard"):
        image_dataset(ImageDataConfig(shards_uri=split, on_bad_sample="fail"))
    open(os.path.join(split, "s-000000.tar"), "wb").close()
    with pytest.raises(BadSampleError, match="s-000000.tar: empty shard"):
        image_dataset(ImageDataConfig(shards_uri=split, on_bad_sample="fail"))
    # skip mode with nothing readable left is an error too, not an empty epoch
    with pytest.raises(BadSampleError, match="no readable shards"):
        image_dataset(ImageDataConfig(shards_uri=split))


@pytest.mark.timeout(60)
def test_missing_uri_and_wrong_credentials(ray_cluster, tmp_path, s3_bucket, auth_s3_endpoint):
    with pytest.raises(StorageError, match=f"{s3_bucket}/nothing/index.json: does not exist"):
        image_dataset(ImageDataConfig(shards_uri=f"{s3_bucket}/nothing"))
    with pytest.raises(StorageError, match="index.json: does not exist"):
        image_dataset(ImageDataConfig(shards_uri=str(tmp_path / "nothing")))
    wrong = StorageOptions(endpoint_url=auth_s3_endpoint, access_key_id="wrong", secret_access_key="wrong",
                           region="us-east-1")
    with pytest.raises(StorageError, match="s3://shards/train/index.json: access denied"):
        image_dataset(ImageDataConfig(shards_uri="s3://shards/train"), storage=wrong)


def test_config_is_validated_up_front():
    with pytest.raises(Exception, match="on_bad_sample"):
        ImageDataConfig(shards_uri="x", on_bad_sample="ignore")
    with pytest.raises(Exception, match="channels"):
        ImageDataConfig(shards_uri="x", channels=2)
