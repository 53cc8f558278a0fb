"""Train the multi-scale VQ tokenizer alone (step 1 of jobs/train_var.py, same config file).

The export lands at <storage>/<run-name>/tokenizer/export/, where the chain looks for it; a rerun
with the same run name resumes from the newest checkpoint, or does nothing if the export exists.

Example:
  python jobs/train_tokenizer.py --config configs/fashion_mnist.yaml --set tokenizer.steps=500
"""

from __future__ import annotations

import sys

from pipeline.chain.cli import chain_parser, load_chain_config
from pipeline.chain.run import plan_step, run_step
from pipeline.core.job_cli import run_job


def main(argv: list[str] | None = None) -> int:
    args = chain_parser("train_tokenizer", __doc__).parse_args(argv)

    def action() -> dict:
        config = load_chain_config(args)
        if args.dry_run:
            return {"dry_run": True, **plan_step(config, "tokenizer")}
        return run_step(config, "tokenizer", force="tokenizer" in args.force)

    return run_job("train_tokenizer", action)


if __name__ == "__main__":
    sys.exit(main())
