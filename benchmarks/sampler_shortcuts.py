"""The sampler's training-free speed-ups on a trained run: images/s and FID per variant, same images asked.

Loads a train_var run's two exports (default: the demo's) and generates `--per-class` images of every
class with the run's own sample settings (`sample.cfg`, `top_k`, `top_p` of its config.json) and the
same (label, seed) pairs for each variant: `official`, then each `--variants` entry, a `:`-joined list of
SamplingSettings fields (`unguided_last_scales=1`, `pruned_last_scales=2:prune_keep=0.5`). The variants
are timed interleaved (`--rounds` rounds, a, b, c, a, b, c, ...; best round each, CPU and wall time).
Then FID of each set against the same N Fashion-MNIST test images (the evaluation's subset, Inception,
28 px), with the train-vs-test floor at that N beside them.

  python benchmarks/sampler_shortcuts.py --run runs/fashion_mnist [--per-class 100]
prints one JSON line.
"""

from __future__ import annotations

import dataclasses
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
                   variants=("unguided_last_scales=1 unguided_last_scales=2 pruned_last_scales=1:prune_keep=0.5 "
                             "pruned_last_scales=2:prune_keep=0.5", "space-separated variants besides the official"),
                   rounds=(2, "timed rounds per setting, interleaved"), batch_size=64, seed=0, threads=0)
    if args.threads:
        torch.set_num_threads(args.threads)
    layout = RunLayout.of(os.path.abspath(args.run))
    tokenizer, var = load_tokenizer(layout.tokenizer_export).eval(), load_var(layout.gpt_export).eval()
    sample = json.loads(read_bytes(join_uri(layout.run, "config.json")))["sample"]
    official = SamplingSettings(sample["cfg"], sample["top_k"], sample["top_p"])
    settings = {"official": official}
    for variant in args.variants.split():
        fields = dict(item.split("=") for item in variant.split(":"))
        settings[variant] = dataclasses.replace(official, **{name: type(getattr(official, name))(value)
                                                           for name, value in fields.items()})
    classes = var.config.num_classes
    labels = [label for label in range(classes) for _ in range(args.per_class)]
    seeds = [args.seed * 1_000_003 + index for index in range(len(labels))]

    # One untimed batch first: the process's first generation pays one-off allocations and thread start-up.
    generate_in_batches(var, tokenizer, labels[:args.batch_size], seeds[:args.batch_size], official, args.batch_size)
    images, wall, cpu = {}, {name: [] for name in settings}, {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, sampling in settings.items():
            started_wall, started_cpu = time.perf_counter(), time.process_time()
            images[name] = generate_in_batches(var, tokenizer, labels, seeds, sampling, args.batch_size)
            wall[name].append(time.perf_counter() - started_wall)
            cpu[name].append(time.process_time() - started_cpu)

    test_images, _ = load_fashion_mnist("test")
    train_images, _ = load_fashion_mnist("train")
    n = len(labels)
    test_features = FeatureStatistics.of(inception_features(
        test_images[subset_order(len(test_images), args.seed, TEST_STREAM)[:n]]))
    floor = frechet_distance(FeatureStatistics.of(inception_features(
        train_images[subset_order(len(train_images), args.seed, TRAIN_STREAM)[:n]])), test_features)
    results = {}
    for name in settings:
        uint8 = resize_uint8(float_to_uint8(images[name]), IMAGE_SIZE)
        fid = frechet_distance(FeatureStatistics.of(inception_features(uint8)), test_features)
        results[name] = {"images_per_second_cpu": round(n / min(cpu[name]), 2),
                         "images_per_second_wall": round(n / min(wall[name]), 2),
                         "speedup_cpu": round(min(cpu["official"]) / min(cpu[name]), 3),
                         "fid": round(fid, 3), "fid_over_floor": round(fid / floor, 3)}
    print(json.dumps({"benchmark": "sampler_shortcuts", "run": layout.run, "n": n, "scales": list(var.config.scales),
                      "sampling": sample, "floor_fid": round(floor, 3), "variants": results,
                      "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
