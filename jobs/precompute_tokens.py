"""Encode every image of the train split with a trained tokenizer into the Parquet token cache.

A Ray Data batch-inference job: shards -> actor pool of tokenizer encoders -> Parquet (schema in
README, "Formats"). By default it reads <storage>/<run-name>/tokenizer/export and writes
<storage>/<run-name>/token_cache, as step 2 of jobs/train_var.py; --tokenizer / --output move them.
A complete cache (its _SUCCESS.json) is not rewritten.

Example:
  python jobs/precompute_tokens.py --config configs/fashion_mnist.yaml --set cache.concurrency=2
  python jobs/precompute_tokens.py --config configs/imagenet_d16.yaml --tokenizer s3://b/vae/export \\
      --output s3://b/caches/imagenet256 --set cache.flip=true
"""

from __future__ import annotations

import sys

from pipeline.chain.cli import chain_parser, run_step_job


def main(argv: list[str] | None = None) -> int:
    parser = chain_parser("precompute_tokens", __doc__)
    parser.add_argument("--tokenizer", metavar="URI", help="tokenizer export to encode with (default: the run's)")
    parser.add_argument("--output", metavar="URI", help="where to write the cache (default: the run's token_cache)")
    args = parser.parse_args(argv)
    return run_step_job("precompute_tokens", "token_cache", args,
                        {"tokenizer_export": args.tokenizer, "token_cache": args.output})


if __name__ == "__main__":
    sys.exit(main())
