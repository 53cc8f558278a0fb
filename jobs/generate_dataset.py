"""Generate a labeled image set with a trained tokenizer + VAR: Parquet (+ optional WebDataset) on a folder or S3.

Examples:
  python jobs/generate_dataset.py --run runs/fashion --output runs/fashion/generated --per-class 1000
  python jobs/generate_dataset.py --run runs/fashion --output runs/fashion/v2 --per-class 100 --set compute.concurrency=2
  python jobs/generate_dataset.py --tokenizer s3://b/run/tokenizer/export --var s3://b/run/gpt/export \
      --output s3://b/sets/v1 --set 'plan.classes={Bag: 500, Sneaker: 200}' --dry-run
  python jobs/generate_dataset.py --run runs/imagenet --output runs/imagenet/fid50k --preset fid-50k-style \
      --npz runs/imagenet/fid50k.npz      # VAR's FID protocol; the .npz is what OpenAI's evaluator.py reads

Presets: fid-50k-style (50 per class, cfg 1.5, top-k 900, top-p 0.96: VAR's FID settings) and
no-guidance (50 per class, cfg 0, top-k 0, top-p 1); values given explicitly win over the preset's.

Exactly once: each work unit is one Parquet file under a fixed name, published atomically, then its
stats JSON (the commit marker). Started again after a crash or a kill, the job skips every unit
that has its stats JSON and finishes the rest. Layout and schema: pipeline/generation/schema.py.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.core.configuration import add_config_arguments
from pipeline.core.job_cli import load_job_config, run_job
from pipeline.generation.config import PRESETS, GenerateConfig
from pipeline.generation.job import prepare, run_generation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="generate_dataset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--run", help="train_var run folder holding both exports (sets model.run)")
    parser.add_argument("--tokenizer", help="tokenizer export URI (sets model.tokenizer)")
    parser.add_argument("--var", help="VAR export URI (sets model.var)")
    parser.add_argument("--output", help="output URI: local folder or s3://bucket/prefix (sets output.uri)")
    parser.add_argument("--per-class", type=int, help="images of every class (sets plan.per_class)")
    parser.add_argument("--seed", type=int, help="plan seed (sets plan.seed)")
    parser.add_argument("--concurrency", type=int, help="generator actors (sets compute.concurrency)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="plan + sampling preset (sets preset); explicit values win")
    parser.add_argument("--npz", help="also export the set as one .npz for OpenAI's evaluator (sets output.npz)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = {"model.run": args.run, "model.tokenizer": args.tokenizer, "model.var": args.var,
             "output.uri": args.output, "plan.per_class": args.per_class, "plan.seed": args.seed,
             "compute.concurrency": args.concurrency, "preset": args.preset, "output.npz": args.npz}

    def action() -> dict:
        config = load_job_config(GenerateConfig, args, extra=flags)
        prepared = prepare(config)  # every check that needs no generation, before any work
        if args.dry_run:
            return {"dry_run": True, **prepared.summary()}
        return run_generation(config, prepared)

    return run_job("generate_dataset", action)


if __name__ == "__main__":
    sys.exit(main())
