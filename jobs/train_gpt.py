"""Train the VAR transformer alone on a token cache (step 3 of jobs/train_var.py, same config file).

By default it reads <storage>/<run-name>/token_cache and tokenizer/export and writes
<storage>/<run-name>/gpt/export; --token-cache / --tokenizer point elsewhere. A cache made by
another tokenizer is refused. A rerun with the same run name resumes from the newest checkpoint.

Example:
  python jobs/train_gpt.py --config configs/fashion_mnist.yaml --set gpt.steps=2000 --set gpt.zero_stage=3
"""

from __future__ import annotations

import sys

from pipeline.chain.cli import chain_parser, run_step_job


def main(argv: list[str] | None = None) -> int:
    parser = chain_parser("train_gpt", __doc__)
    parser.add_argument("--token-cache", metavar="URI", help="token cache to train on (default: the run's)")
    parser.add_argument("--tokenizer", metavar="URI", help="tokenizer export the cache was made with")
    args = parser.parse_args(argv)
    return run_step_job("train_gpt", "gpt", args, {"tokenizer_export": args.tokenizer, "token_cache": args.token_cache})


if __name__ == "__main__":
    sys.exit(main())
