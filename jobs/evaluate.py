"""Evaluate a trained run and its generated set: FID, class-consistency, reconstruction, grid, loss curves.

Examples:
  python jobs/evaluate.py --run runs/fashion                       # generated set at runs/fashion/generated
  python jobs/evaluate.py --run runs/fashion --set fid.samples=1000 --set features.samples=10000
  python jobs/evaluate.py --generated s3://b/sets/v1 --output s3://b/sets/v1/eval --set reconstruction.samples=0

Writes <output>/metrics.json (every figure, each with its N), samples.png (one row per class) and
loss_curves.png (from the exports' metrics.jsonl). FID(generated, test) is reported next to
FID(train, test) at the same N: the value a perfect generator would get with that many samples.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.core.configuration import add_config_arguments
from pipeline.core.job_cli import load_job_config, run_job
from pipeline.core.storage import join_uri
from pipeline.evaluation.config import EvaluateConfig
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = args.run or (join_uri(args.storage, args.run_name) if args.storage and args.run_name else None)
    flags = {"model.run": run, "generated": args.generated, "output": args.output}

    def action() -> dict:
        config = load_job_config(EvaluateConfig, args, extra=flags)
        paths = resolve_paths(config)
        check_inputs(config, paths)
        if args.dry_run:
            return {"dry_run": True, **paths.__dict__}
        return evaluate(config)

    return run_job("evaluate", action)


if __name__ == "__main__":
    sys.exit(main())
