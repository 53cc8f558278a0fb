"""Evaluate a generated set of any run against real images: FID, KID, precision/recall and their real-vs-real
floor at one N, class-consistency, reconstruction, grid, loss curves.

Examples:
  python jobs/evaluate.py --run runs/mine                      # set at runs/mine/generated vs the run's validation split
  python jobs/evaluate.py --run runs/mine --reference s3://b/data/val --set fid.samples=5000
  python jobs/evaluate.py --run runs/fashion_mnist --preset fashion-mnist   # Fashion-MNIST's own IDX test split
  python jobs/evaluate.py --generated s3://b/sets/v1 --output s3://b/sets/v1/eval --reference s3://b/data/val \\
      --set reconstruction.samples=0

The reference is the run's data.validation split by default, or any shard split (--reference). The train
split (the run's data.train) trains a small classifier for class-consistency and gives the floor: FID,
KID and precision/recall of N train images vs the same N reference images, what a perfect generator
would get at this N. Writes <output>/metrics.json (every figure, each with its N), samples.png (one row
per class, its class name) and loss_curves.png (from the exports' metrics.jsonl).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.core.configuration import add_config_arguments
from pipeline.core.job_cli import load_job_config, run_job
from pipeline.core.storage import join_uri
from pipeline.evaluation.config import PRESETS, EvaluateConfig
from pipeline.evaluation.run import check_inputs, evaluate, resolve_paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--run", help="train_var run folder URI (sets model.run)")
    parser.add_argument("--storage", help="root of the runs; with --run-name gives model.run")
    parser.add_argument("--run-name", help="run name under --storage")
    parser.add_argument("--generated", help="generated set URI (default <run>/generated)")
    parser.add_argument("--output", help="where the figures go (default <run>/eval)")
    parser.add_argument("--reference", help="a shard split to judge against (sets reference.source=shards and "
                                            "reference.shards_uri; default: the run's validation split)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="fashion-mnist: Fashion-MNIST's IDX splits")
    parser.add_argument("--samples", type=int, help="N per side of the Inception figures (sets fid.samples)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = args.run or (join_uri(args.storage, args.run_name) if args.storage and args.run_name else None)
    flags = {"model.run": run, "generated": args.generated, "output": args.output, "preset": args.preset,
             "fid.samples": args.samples}
    if args.reference:
        flags.update({"reference.source": "shards", "reference.shards_uri": args.reference})

    def action() -> dict:
        config = load_job_config(EvaluateConfig, args, extra=flags)
        paths = resolve_paths(config)
        reference, train = check_inputs(config, paths)
        if args.dry_run:
            return {"dry_run": True, **paths.__dict__, "reference": reference.describe(), "train": train.describe()}
        return evaluate(config)

    return run_job("evaluate", action)


if __name__ == "__main__":
    sys.exit(main())
