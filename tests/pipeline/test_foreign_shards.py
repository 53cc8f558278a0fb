"""WebDataset shards other tools wrote (webdataset's own ShardWriter): .jpg/.jpeg/.png/.webp images,
labels as .cls or a .json field, no index.json. The index is built by listing and cached; the
reader and a tokenizer training run take them as they are."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.data.listing import LISTED_INDEX_FILE, ListingError, load_index
from pipeline.data.reader import ImageDataConfig, bad_sample_summary, dataset_index, image_dataset
from pipeline.data.sources.fashion_mnist import CLASS_NAMES, load_fashion_mnist

pytestmark = pytest.mark.ray


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def _shard_writer(folder, samples: list[dict], maxcount: int) -> None:
    os.makedirs(folder, exist_ok=True)
    with wds.ShardWriter(os.path.join(str(folder), "part-%05d.tar"), maxcount=maxcount, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)


def _fashion_samples(count: int, image_ext: str, label: str) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Fashion-MNIST images as webdataset samples: `image_ext` bytes, the label as .cls or in .json."""
    images, labels = load_fashion_mnist("train")
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[image_ext]
    samples = []
    for i in range(count):
        sample = {"__key__": f"{i:06d}", image_ext: _encoded(images[i], fmt)}
        if label == "cls":
            sample["cls"] = int(labels[i])
        elif label == "json-id":
            sample["json"] = {"label": int(labels[i]), "caption": "a piece of clothing"}
        else:  # json-name, nested
            sample["json"] = {"meta": {"class": CLASS_NAMES[labels[i]]}}
        samples.append(sample)
    return samples, images[:count], labels[:count]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("image_ext,label,label_key", [
    ("jpg", "json-id", "label"), ("webp", "cls", None), ("jpeg", "json-name", "meta.class"), ("png", "cls", None)])
def test_reader_takes_shards_without_an_index(ray_cluster, tmp_path, image_ext, label, label_key):
    split = tmp_path / "shards"
    samples, images, labels = _fashion_samples(50, image_ext, label)
    _shard_writer(split, samples, maxcount=20)
    config = ImageDataConfig(shards_uri=str(split), shuffle=False, shuffle_buffer_size=0, label_key=label_key)

    index = dataset_index(config)
    assert [s.name for s in index.shards] == ["part-00000.tar", "part-00001.tar", "part-00002.tar"]
    assert [s.samples for s in index.shards] == [20, 20, 10] and index.total == 50
    channels = 3 if image_ext == "webp" else 1  # WebP has no gray mode: a gray image comes back RGB
    assert (index.image_size, index.channels, index.source["name"]) == (28, channels, "listing")
    if label == "json-name":  # names: the sorted distinct ones
        assert index.class_names == sorted({CLASS_NAMES[i] for i in labels})
    else:  # ids: "0".."max"
        assert index.class_names == [str(i) for i in range(int(labels.max()) + 1)]
    assert (split / LISTED_INDEX_FILE).exists() and not (split / "index.json").exists()

    rows = {row["key"]: row for row in image_dataset(config).take_all()}
    assert len(rows) == 50 and bad_sample_summary(config).clean
    for key, row in rows.items():
        i = int(key)
        expected = index.class_names.index(CLASS_NAMES[labels[i]]) if label == "json-name" else labels[i]
        assert row["label"] == expected and row["image"].shape == (channels, 28, 28)
        pixels = np.rint((row["image"][0] + 1) * 127.5).astype(np.int16)
        if image_ext in ("png", "webp"):  # lossless
            np.testing.assert_array_equal(pixels, images[i])
        else:
            assert np.abs(pixels - images[i]).mean() < 8  # JPEG


@pytest.mark.timeout(120)
def test_the_listed_index_is_cached_and_built_again_when_the_shards_change(ray_cluster, tmp_path):
    split = tmp_path / "shards"
    samples, _, _ = _fashion_samples(30, "jpg", "json-id")
    _shard_writer(split, samples, maxcount=20)
    cached = split / LISTED_INDEX_FILE
    first = load_index(str(split), label_key="label")
    stamp = cached.stat().st_mtime_ns
    from pipeline.data import listing

    listing._MEMO.clear()
    assert load_index(str(split), label_key="label") == first and cached.stat().st_mtime_ns == stamp  # from cache

    more, _, _ = _fashion_samples(5, "jpg", "json-id")
    wds_sink = wds.TarWriter(str(split / "part-00009.tar"))
    for sample in more:
        wds_sink.write({**sample, "__key__": "x" + sample["__key__"]})
    wds_sink.close()
    again = load_index(str(split), label_key="label")
    assert again.total == 35 and cached.stat().st_mtime_ns != stamp

    # Another cache folder (shards in a place the job may not write): the index goes there.
    elsewhere = tmp_path / "cache"
    index = load_index(str(split), label_key="label", cache=str(elsewhere))
    assert index.total == 35 and [p.name.startswith("shards-") for p in elsewhere.iterdir()] == [True]

    # Labels asked from .cls when the samples only carry .json: one line saying what to set.
    with pytest.raises(ListingError, match="no .cls label; set label_key"):
        load_index(str(split))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ListingError, match="no index.json and no .tar shards"):
        load_index(str(empty))


@pytest.mark.timeout(300)
def test_tokenizer_trains_from_shard_writer_jpg_and_json_without_an_index(ray_cluster, tmp_path):
    from pipeline.core.exports import read_export_info
    from pipeline.train.config import TokenizerStageConfig
    from pipeline.train.tokenizer_stage import run_tokenizer_stage
    from tests.train.train_helpers import TINY_TOKENIZER, read_metrics

    split = tmp_path / "shards"
    samples, _, _ = _fashion_samples(32, "jpg", "json-id")  # 28 px gray JPEGs, read at the tokenizer's 16 px
    _shard_writer(split, samples, maxcount=16)
    assert sorted(os.listdir(split)) == ["part-00000.tar", "part-00001.tar"]
    config = TokenizerStageConfig(model=TINY_TOKENIZER, num_workers=1, global_batch_size=16, micro_batch_size=16,
                                  steps=2, warmup_steps=1, checkpoint_every=2, log_every=1, max_failures=0,
                                  zero_stage=1)
    data = ImageDataConfig(shards_uri=str(split), label_key="label", shuffle=False, shuffle_buffer_size=0)
    export = run_tokenizer_stage(config, data, str(tmp_path / "runs"), "tokenizer")
    metrics = read_metrics(export)
    assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)
    info = read_export_info(export)
    assert info["data"]["samples"] == 32 and info["data"]["skipped_samples"] == 0
    assert json.loads((split / LISTED_INDEX_FILE).read_text())["total"] == 32
