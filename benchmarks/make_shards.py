"""make_shards throughput from an image folder: images/s with one worker and with two, in one run.

A generated ImageNet-style folder (`--classes` folders of `--images` JPEGs in all, `--source-width` x
`--source-height`, smooth colour fields plus noise) is sharded at `--image-size` (decode, LANCZOS resize
+ center crop, PNG encode: the work of a real folder) with `--workers-a` and then `--workers-b`
processes, `--rounds` times, interleaved (a, b, a, b, ...), each into a fresh output folder. The
figure of each side is its best round (the machine is shared: the best is the least disturbed).

Wall time alone misleads on a shared machine, so CPU time is counted too (this process and its
reaped worker processes, `getrusage`): `cpu_seconds` per side, and `speedup_if_idle`, the speedup the
CPU time allows on idle cores, `min(workers_b / workers_a, shards) * cpu_a / cpu_b` (it is below the
worker ratio by exactly the CPU that the extra processes cost). `loadavg` before and after says how
busy the machine was; `cores_used` (CPU time / wall time) how much of it each side got. Prints one JSON line last on stdout.

  python benchmarks/make_shards.py --images 600 --image-size 256 --rounds 2
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from options import options
from PIL import Image

from pipeline.data.sharding import MakeShardsConfig, make_shards


def make_folder(root: Path, images: int, classes: int, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    for i in range(images):
        folder = root / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0, 6, 3)
        base = np.stack([np.sin(a * x + b * y), np.cos(b * x - c * y), np.sin(c * (x + y) + a)], -1)
        pixels = (base * 100 + 128 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def loadavg() -> list[float]:
    return [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]


def run_once(folder: Path, output: Path, workers: int, size: int, per_shard: int) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    config = MakeShardsConfig(source="folder", input=str(folder), output=str(output), image_size=size,
                              samples_per_shard=per_shard, workers=workers)
    cpu, wall = cpu_seconds(), time.perf_counter()
    index = make_shards(config)["train"]
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return {"workers": workers, "images": index.total, "shards": len(index.shards), "seconds": round(wall, 3),
            "cpu_seconds": round(cpu, 3), "cores_used": round(cpu / wall, 2),
            "images_per_second": round(index.total / wall, 1)}


def main() -> None:
    args = options(__doc__, images=600, classes=10, source_width=400, source_height=300, image_size=256,
                   samples_per_shard=50, workers_a=1, workers_b=2, rounds=2)
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="bench_make_shards_") as tmp:
        folder = make_folder(Path(tmp, "images"), args.images, args.classes, args.source_width, args.source_height)
        runs = []
        for round_number in range(args.rounds):
            for workers in (args.workers_a, args.workers_b):
                result = run_once(folder, Path(tmp, "out"), workers, args.image_size, args.samples_per_shard)
                runs.append({"round": round_number, **result})
                print(json.dumps(runs[-1]), flush=True)
    load_after = loadavg()

    def best(workers: int) -> dict:
        return min((run for run in runs if run["workers"] == workers), key=lambda run: run["seconds"])

    a, b = best(args.workers_a), best(args.workers_b)
    parallel = min(args.workers_b / args.workers_a, b["shards"])
    print(json.dumps({
        "benchmark": "make_shards", "images": a["images"], "image_size": args.image_size,
        "source": f"{args.source_width}x{args.source_height} jpg", "samples_per_shard": args.samples_per_shard,
        "shards": a["shards"], "cores": os.cpu_count(), "rounds": args.rounds,
        f"images_per_second_{args.workers_a}_worker": a["images_per_second"],
        f"images_per_second_{args.workers_b}_workers": b["images_per_second"],
        "speedup": round(a["seconds"] / b["seconds"], 2),
        "cpu_seconds": {str(args.workers_a): a["cpu_seconds"], str(args.workers_b): b["cpu_seconds"]},
        "cores_used": {str(args.workers_a): a["cores_used"], str(args.workers_b): b["cores_used"]},
        "speedup_if_idle": round(parallel * a["cpu_seconds"] / b["cpu_seconds"], 2),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "runs": runs,
    }))


if __name__ == "__main__":
    main()
