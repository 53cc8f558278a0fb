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
import json
import logging
import sys

from pipeline.configuration import ConfigError, add_config_arguments, load_config
from pipeline.evaluation.config import EvaluateConfig
from pipeline.evaluation.run import EvaluationError, check_inputs, evaluate, resolve_paths
from pipeline.storage import StorageError, join_uri


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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    run = args.run or (join_uri(args.storage, args.run_name) if args.storage and args.run_name else None)
    flags = {"model.run": run, "generated": args.generated, "output": args.output}
    try:
        config = load_config(EvaluateConfig, args.config, args.overrides, extra=flags)
        paths = resolve_paths(config)
        check_inputs(config, paths)
        if args.dry_run:
            print(json.dumps({"dry_run": True, **paths.__dict__}))
            return 0
        figures = evaluate(config)
    except (ConfigError, EvaluationError, StorageError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
