"""Ingest throughput: images/s from the same WebDataset shards into torch batches.

(a) this project's reader (pipeline.data.reader: one Ray Data read task per shard, decode fused into it),
(b) webdataset's own WebDataset + WebLoader with the same number of CPU worker processes,
both ending in float32 [B, C, H, W] in [-1, 1] + int64 labels. Each side runs `--epochs` passes,
interleaved; the figure is the best epoch after the first (workers warm), whole and after each
epoch's first batch ("steady"). Two datasets: 28 px real Fashion-MNIST and 256 px synthetic RGB.
Prints one JSON line.

  python benchmarks/ingest.py --workers 2 --fmnist-samples 20000 --rgb-samples 2000
"""

from __future__ import annotations

import json
import os
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from options import options  # noqa: E402

from pipeline.data.sharding import MakeShardsConfig, make_shards  # noqa: E402
from pipeline.data.shards import Sample, read_index, shard_uris, write_shards  # noqa: E402


def synthetic_rgb(count: int, size: int, seed: int = 0):
    """Smooth colour fields plus noise: compresses and decodes like photos more than pure noise does."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(count):
        a, b, c = rng.uniform(0, 6, 3)
        base = np.stack([np.sin(a * x + b * y), np.cos(b * x - c * y), np.sin(c * (x + y) + a)], -1)
        pixels = (base * 100 + 128 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        yield Sample(key=f"synthetic_{i:07d}", image=pixels, label=i % 10, metadata={"source": "synthetic"})


def prepare(root: str, fmnist_samples: int, rgb_samples: int, size: int, per_shard: int) -> dict[str, str]:
    fm = os.path.join(root, "fmnist")
    make_shards(MakeShardsConfig(source="fashion-mnist", output=fm, splits=["train"], limit=fmnist_samples,
                                 samples_per_shard=per_shard))
    rgb = os.path.join(root, "rgb", "train")
    write_shards(synthetic_rgb(rgb_samples, size), rgb, split="train", class_names=[str(i) for i in range(10)],
                 image_size=size, channels=3, source={"name": "synthetic"}, samples_per_shard=max(50, per_shard // 16))
    return {"fmnist_28": os.path.join(fm, "train"), f"rgb_{size}": rgb}


def rate(batches) -> tuple[float, float, int]:
    """(images/s over the whole epoch, images/s after the first batch, images). The second leaves
    out the per-epoch start (Ray Data plans and launches an execution; the loader's workers are
    persistent), which short benchmark epochs magnify and long training epochs amortise."""
    start, count = time.perf_counter(), 0
    first_at, first_count = None, 0
    for images, labels in batches:
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        count += len(labels)
        if first_at is None:
            first_at, first_count = time.perf_counter(), count
    end = time.perf_counter()
    steady = (count - first_count) / (end - first_at) if end > first_at else float("nan")
    return count / (end - start), steady, count


def ray_reader(split: str, batch_size: int):
    """Epoch -> iterator of (images, labels) through pipeline.data.reader."""
    from pipeline.data.reader import ImageDataConfig, image_dataset, torch_batches

    config = ImageDataConfig(shards_uri=split, shuffle_buffer_size=0)
    dataset = image_dataset(config)

    def batches(epoch):
        for batch in torch_batches(dataset, config, batch_size, epoch):
            yield batch["image"], batch["label"]

    return batches


def _normalise(batch):
    images, labels = batch
    images = torch.from_numpy(np.ascontiguousarray(images))
    images = images.permute(0, 3, 1, 2) if images.ndim == 4 else images.unsqueeze(1)
    return images.float().mul_(2 / 255).sub_(1), torch.as_tensor(labels, dtype=torch.int64)


def webdataset_loader(split: str, workers: int, batch_size: int):
    """Epoch -> iterator of (images, labels) through webdataset's WebDataset + WebLoader."""
    index = read_index(split)
    mode = "l8" if index.channels == 1 else "rgb8"
    dataset = (wds.WebDataset(shard_uris(index, split), shardshuffle=False, empty_check=False)
               .decode(mode).to_tuple("png", "cls").batched(batch_size).map(_normalise))
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=True)
    return lambda epoch: iter(loader)


def main() -> None:
    args = options(__doc__, workers=(2, "CPU workers on both sides (Ray num_cpus, loader)"), fmnist_samples=20000,
                   rgb_samples=2000, rgb_size=256, samples_per_shard=2000, batch_size=256, epochs=3)

    import ray

    # address="local": a cluster of exactly --workers CPUs, never one someone else started with `ray start`.
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    torch.set_num_threads(1)
    results = {"benchmark": "ingest", "workers": args.workers, "batch_size": args.batch_size,
               "epochs": args.epochs, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as root:
        splits = prepare(root, args.fmnist_samples, args.rgb_samples, args.rgb_size, args.samples_per_shard)
        for name, split in splits.items():
            ray_batches = ray_reader(split, args.batch_size)
            wds_batches = webdataset_loader(split, args.workers, args.batch_size)
            ray_rates, wds_rates, ray_steady, wds_steady = [], [], [], []
            # Interleaved epochs: the machine's load changes over time, and both sides see the same.
            for epoch in range(args.epochs):
                ray_rate, ray_after_first, ray_count = rate(ray_batches(epoch))
                wds_rate, wds_after_first, wds_count = rate(wds_batches(epoch))
                assert ray_count == wds_count, (ray_count, wds_count)
                ray_rates.append(ray_rate)
                wds_rates.append(wds_rate)
                ray_steady.append(ray_after_first)
                wds_steady.append(wds_after_first)
            ray_best, wds_best = max(ray_rates[1:] or ray_rates), max(wds_rates[1:] or wds_rates)
            ray_steady_best, wds_steady_best = max(ray_steady[1:] or ray_steady), max(wds_steady[1:] or wds_steady)
            results[name] = {"samples": ray_count, "ray_data_images_per_s": round(ray_best),
                             "webdataset_images_per_s": round(wds_best), "ratio": round(ray_best / wds_best, 3),
                             "steady_ray_data_images_per_s": round(ray_steady_best),
                             "steady_webdataset_images_per_s": round(wds_steady_best),
                             "steady_ratio": round(ray_steady_best / wds_steady_best, 3),
                             "ray_data_epochs": [round(r) for r in ray_rates],
                             "webdataset_epochs": [round(r) for r in wds_rates]}
    ray.shutdown()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
