"""Shard writing (make_shards) and index.json: no Ray here, shards are checked with webdataset itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from jobs.make_shards import main as make_shards_main
from pipeline.core.storage import StorageError, join_uri, list_files
from pipeline.data.sharding import MakeShardsConfig, make_shards
from pipeline.data.shards import ShardIndex, read_index, write_index
from pipeline.data.sources.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from tests.pipeline.shard_helpers import make_rgb_folder


def _read_with_webdataset(urls: list[str], mode: str = "l8") -> dict[str, dict]:
    dataset = wds.WebDataset(urls, shardshuffle=False).decode(mode)  # l8 / rgb8: PNG as uint8 gray / RGB
    return {sample["__key__"]: sample for sample in dataset}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_fashion_mnist_shards_hold_the_real_images(where, tmp_path, fashion_mnist_dir, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket") + "/fm"
    indexes = make_shards(MakeShardsConfig(source="fashion-mnist", input=fashion_mnist_dir, output=root,
                                           limit=90, samples_per_shard=40, val_fraction=0.1))
    assert sorted(indexes) == ["test", "train", "validation"]
    train = read_index(join_uri(root, "train"))
    assert train == indexes["train"]
    assert [s.name for s in train.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s.samples for s in train.shards] == [40, 40, 10] and train.total == 90
    assert (train.class_names, train.image_size, train.channels) == (list(CLASS_NAMES), 28, 1)
    assert train.source["name"] == "fashion-mnist"
    assert list_files(join_uri(root, "train"), ".tar") == [join_uri(root, "train", s.name) for s in train.shards]

    if where == "local":
        urls = [join_uri(root, "train", s.name) for s in train.shards]
        for url, shard in zip(urls, train.shards):
            assert os.path.getsize(url) == shard.bytes
            names = tarfile.open(url).getnames()
            assert all(name.count(".") == 1 for name in names)  # key + one extension: no dots in keys
            assert {n.split(".")[1] for n in names} == {"png", "cls", "json"}
        samples = _read_with_webdataset(urls)
        images, labels = load_fashion_mnist("train", fashion_mnist_dir)
        assert len(samples) == 90
        for key, sample in samples.items():
            index = sample["json"]["index"]
            assert key == f"fmnist_train_{index:05d}"
            assert int(sample["cls"]) == labels[index]
            np.testing.assert_array_equal(sample["png"], images[index])

    # Validation is carved from train: disjoint keys, and the same command gives the same split.
    validation = read_index(join_uri(root, "validation"))
    assert validation.total == 90 and validation.split == "validation"


def test_validation_split_is_disjoint_and_deterministic(tmp_path, fashion_mnist_dir):
    def keys(output):
        make_shards(MakeShardsConfig(source="fashion-mnist", input=fashion_mnist_dir, output=output,
                                     splits=["train"], val_fraction=0.5, limit=50, samples_per_shard=100))
        return {split: set(_read_with_webdataset([os.path.join(output, split, "shard-000000.tar")]))
                for split in ("train", "validation")}

    first, second = keys(str(tmp_path / "a")), keys(str(tmp_path / "b"))
    assert first == second
    assert not first["train"] & first["validation"] and len(first["train"]) == 50


def test_image_folder_source_resizes_and_converts(tmp_path):
    folder = make_rgb_folder(tmp_path / "images")
    (folder / "class_1" / "broken.png").write_bytes(b"not an image")
    output = str(tmp_path / "shards")
    indexes = make_shards(MakeShardsConfig(source="folder", input=str(folder), output=output, image_size=32,
                                           samples_per_shard=7, val_fraction=0.2, seed=3))
    train, validation = indexes["train"], indexes["validation"]
    assert train.class_names == ["class_0", "class_1", "class_2"] and train.channels == 3
    assert train.total + validation.total == 18  # 19 files, the broken one skipped and listed
    assert [os.path.basename(p) for p in train.source["unreadable_files"] + validation.source["unreadable_files"]] \
        == ["broken.png"]
    samples = _read_with_webdataset([os.path.join(output, "train", s.name) for s in train.shards], "rgb8")
    for key, sample in samples.items():
        assert "." not in key and sample["png"].shape == (32, 32, 3)
        meta = sample["json"]
        assert meta["class"] == f"class_{int(sample['cls'])}"
        # The class colour channel survives resize + crop (the grayscale images excepted).
        original = Image.open(folder / meta["path"])
        if original.mode == "RGB":
            assert sample["png"][..., int(sample["cls"]) % 3].mean() > 200


def test_make_shards_cli(tmp_path, fashion_mnist_dir, capsys):
    help_text = subprocess.run([sys.executable, "-m", "jobs.make_shards", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--samples-per-shard" in help_text.stdout

    output = str(tmp_path / "out")
    assert make_shards_main(["--source", "fashion-mnist", "--input", fashion_mnist_dir, "--output", output,
                             "--split", "test", "--limit", "30", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["splits"]["test"]["samples"] == 30 and not os.path.exists(output)

    assert make_shards_main(["--source", "fashion-mnist", "--input", fashion_mnist_dir, "--output", output,
                             "--split", "test", "--limit", "30", "--samples-per-shard", "20", "--prefix", "fm",
                             "--image-size", "16", "--channels", "3"]) == 0
    assert sorted(os.listdir(os.path.join(output, "test"))) == ["fm-000000.tar", "fm-000001.tar", "index.json"]
    index = read_index(os.path.join(output, "test"))
    assert (index.image_size, index.channels, index.total) == (16, 3, 30)

    assert make_shards_main(["--source", "fashion-mnist", "--output", output, "--samples-per-shard", "0"]) == 2
    assert "config error: samples_per_shard" in capsys.readouterr().err
    assert make_shards_main(["--source", "folder", "--input", str(tmp_path / "none"), "--image-size", "8",
                             "--output", output]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_index_errors_name_the_file(tmp_path):
    with pytest.raises(StorageError, match="index.json: does not exist"):
        read_index(str(tmp_path))
    (tmp_path / "index.json").write_text(json.dumps({"format": "varray.shards/1", "split": "x", "shards": [
        {"name": "a.tar", "samples": 3, "bytes": 10}], "total": 4, "class_names": ["a"], "image_size": 8,
        "channels": 1, "source": {}}))
    with pytest.raises(ValueError, match="index.json: not a valid shard index.*total is 4 but the shards hold 3"):
        read_index(str(tmp_path))
    with pytest.raises(ValueError):
        write_index(ShardIndex(split="x", shards=[], total=0, class_names=[], image_size=8, channels=2,
                               source={}), str(tmp_path))
