"""Train VAR end to end: tokenizer stage -> token cache -> GPT stage -> sample grid PNG.

Every output goes under <storage>/<run-name>/ (tokenizer/export, token_cache, gpt/export,
samples.png, chain.json). A step whose output exists is skipped, so the same command resumes a
killed run. Without RAY_ADDRESS a local Ray starts in-process; under `ray job submit` (or with
RAY_ADDRESS set) it joins that cluster.

Examples:
  python jobs/train_var.py --config configs/fashion_mnist.yaml
  python jobs/train_var.py --config configs/tiny.yaml --storage /tmp/runs --run-name smoke --set gpt.steps=20
  python jobs/train_var.py --config configs/imagenet_d16.yaml --storage s3://my-bucket/runs --dry-run
  ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
      python jobs/train_var.py --config configs/tiny.yaml --storage /tmp/runs
"""

from __future__ import annotations

import sys

from pipeline.chain.cli import chain_parser, load_chain_config
from pipeline.chain.run import plan_chain, run_chain
from pipeline.core.job_cli import run_job


def main(argv: list[str] | None = None) -> int:
    args = chain_parser("train_var", __doc__).parse_args(argv)

    def action() -> dict:
        config = load_chain_config(args)
        if args.dry_run:
            return {"dry_run": True, **plan_chain(config, force=args.force)}
        return run_chain(config, force=args.force)

    return run_job("train_var", action)


if __name__ == "__main__":
    sys.exit(main())
