"""The unguided-last-scales speed-up on a trained run: images/s and FID for each setting, same images asked.

Loads a train_var run's two exports (default: the demo's), generates `--per-class` images of every class
with the run's own sample settings (`sample.cfg`, `top_k`, `top_p` of its config.json) and the same
(label, seed) pairs for each `--unguided` value (0 is the official sampler), and times them interleaved
(`--rounds` rounds, a, b, c, a, b, c, ...; best round per setting, CPU time and wall time). Then FID of
each set against the same N Fashion-MNIST test images (the evaluation's subset, Inception, 28 px), with
the train-vs-test floor at that N beside them.

  python benchmarks/guidance_skip.py --run runs/fashion_mnist [--per-class 100] [--unguided 0,1,2]
prints one JSON line.
"""

from __future__ import annotations

import json
import os
import time

import torch
from options import options

from pipeline.core.exports import load_tokenizer, load_var
from pipeline.core.images import float_to_uint8, resize_uint8
from pipeline.core.layout import RunLayout
from pipeline.core.storage import join_uri, read_bytes
from pipeline.data.sources.fashion_mnist import load_fashion_mnist
from pipeline.evaluation.classifier import IMAGE_SIZE
from pipeline.evaluation.frechet import FeatureStatistics, frechet_distance
from pipeline.evaluation.inception import inception_features
from pipeline.evaluation.reference import subset_order
from var_model import SamplingSettings, generate_in_batches

TEST_STREAM, TRAIN_STREAM = 1, 2  # the evaluation's streams of the reference (test) and train subsets


def main() -> None:
    args = options(__doc__, run=("runs/fashion_mnist", "a finished train_var run"),
                   per_class=(100, "images per class (N = per_class x classes, >= 1000 for the README)"),
                   unguided=("0,1,2", "comma-separated unguided_last_scales values; 0 is the official sampler"),
                   rounds=(2, "timed rounds per setting, interleaved"), batch_size=64, seed=0, threads=0)
    if args.threads:
        torch.set_num_threads(args.threads)
    layout = RunLayout.of(os.path.abspath(args.run))
    tokenizer, var = load_tokenizer(layout.tokenizer_export).eval(), load_var(layout.gpt_export).eval()
    sample = json.loads(read_bytes(join_uri(layout.run, "config.json")))["sample"]
    settings = {count: SamplingSettings(sample["cfg"], sample["top_k"], sample["top_p"], count)
                for count in map(int, args.unguided.split(","))}
    classes = var.config.num_classes
    labels = [label for label in range(classes) for _ in range(args.per_class)]
    seeds = [args.seed * 1_000_003 + index for index in range(len(labels))]

    images, wall, cpu = {}, {count: [] for count in settings}, {count: [] for count in settings}
    for _ in range(args.rounds):
        for count, sampling in settings.items():
            started_wall, started_cpu = time.perf_counter(), time.process_time()
            images[count] = generate_in_batches(var, tokenizer, labels, seeds, sampling, args.batch_size)
            wall[count].append(time.perf_counter() - started_wall)
            cpu[count].append(time.process_time() - started_cpu)

    test_images, _ = load_fashion_mnist("test")
    train_images, _ = load_fashion_mnist("train")
    n = len(labels)
    test_features = FeatureStatistics.of(inception_features(
        test_images[subset_order(len(test_images), args.seed, TEST_STREAM)[:n]]))
    floor = frechet_distance(FeatureStatistics.of(inception_features(
        train_images[subset_order(len(train_images), args.seed, TRAIN_STREAM)[:n]])), test_features)
    official = min(cpu[0]) if 0 in cpu else None
    results = {}
    for count in settings:
        uint8 = resize_uint8(float_to_uint8(images[count]), IMAGE_SIZE)
        fid = frechet_distance(FeatureStatistics.of(inception_features(uint8)), test_features)
        results[str(count)] = {"images_per_second_cpu": round(n / min(cpu[count]), 2),
                               "images_per_second_wall": round(n / min(wall[count]), 2),
                               "speedup_cpu": round(official / min(cpu[count]), 3) if official else None,
                               "fid": round(fid, 3), "fid_over_floor": round(fid / floor, 3)}
    print(json.dumps({"benchmark": "guidance_skip", "run": layout.run, "n": n, "scales": list(var.config.scales),
                      "sampling": sample, "floor_fid": round(floor, 3), "unguided_last_scales": results,
                      "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
