"""Train the multi-scale VQ tokenizer alone (step 1 of jobs/train_var.py, same config file).

The export lands at <storage>/<run-name>/tokenizer/export/, where the chain looks for it; a rerun
with the same run name resumes from the newest checkpoint, or does nothing if the export exists.

Example:
  python jobs/train_tokenizer.py --config configs/fashion_mnist.yaml --set tokenizer.steps=500
"""

from __future__ import annotations

import sys

from pipeline.chain.cli import chain_parser, run_step_job


def main(argv: list[str] | None = None) -> int:
    return run_step_job("train_tokenizer", "tokenizer", chain_parser("train_tokenizer", __doc__).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
