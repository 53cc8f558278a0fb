"""The laptop demo: Fashion-MNIST -> tokenizer + VAR -> a generated labeled set -> its evaluation.

    python jobs/demo.py                                  # ~44 min on 2 CPU cores (measured), ~2x loaded
    python jobs/demo.py --per-class 300 --fid-samples 1000
    python jobs/demo.py --set gpt.steps=3000             # any training-config override, as train_var takes

Steps (each skipped when its output exists, so the same command resumes):
  1. shards from the Debian Fashion-MNIST files, then jobs/train_var's chain with
     configs/fashion_mnist.yaml: tokenizer -> token cache -> VAR -> samples.png
  2. jobs/generate_dataset: --per-class images of every class as Parquet under <run>/generated
  3. jobs/evaluate against the run's validation split (Fashion-MNIST's test split): FID, KID and
     precision/recall of generated vs test next to train vs test at the same N (1,000 by default),
     class-consistency, reconstruction PSNR/FID, sample grid and loss curves under <run>/eval
The last line is one JSON object (also written to <run>/demo.json) with the wall time and figures.
"""

from __future__ import annotations

import sys

from pipeline.chain.cli import chain_parser, load_chain_config
from pipeline.chain.demo import DemoSettings, evaluate_config, generate_config, run_demo
from pipeline.core.configuration import load_config
from pipeline.core.job_cli import run_job

DEFAULT_CONFIG = "configs/fashion_mnist.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = chain_parser("demo", __doc__)
    parser.set_defaults(config=DEFAULT_CONFIG)
    for flag, field in (("--per-class", "per_class"), ("--concurrency", "concurrency"),
                        ("--fid-samples", "fid_samples"), ("--feature-samples", "feature_samples"),
                        ("--reconstruction-samples", "reconstruction_samples")):
        parser.add_argument(flag, dest=field, type=int, help=DemoSettings.model_fields[field].description)
    args = parser.parse_args(argv)

    def action() -> dict:
        train = load_chain_config(args)
        flags = {name: getattr(args, name, None) for name in DemoSettings.model_fields}
        settings = load_config(DemoSettings, None, extra=flags)
        if args.dry_run:
            from pipeline.chain.run import plan_chain

            return {"dry_run": True, "train": plan_chain(train),
                    "generate": generate_config(train, settings).model_dump(),
                    "evaluate": evaluate_config(train, settings).model_dump()}
        return run_demo(train, settings, force=args.force)

    return run_job("demo", action)


if __name__ == "__main__":
    sys.exit(main())
