"""Use the released VAR tokenizer instead of training one: publish an official checkpoint
(vae_ch160v4096z32.pth, official key layout) as <storage>/<run-name>/tokenizer/export, where
jobs/train_var.py then finds stage 1 done and goes on to the token cache.

The checkpoint is read with torch.load(weights_only=True), strictly; the model it describes must
equal the config's tokenizer (preset official-256 in configs/imagenet_*.yaml).

Example:
  python jobs/import_tokenizer.py --config configs/imagenet_d16.yaml --checkpoint vae_ch160v4096z32.pth \\
      --storage s3://YOUR-BUCKET/runs
"""

from __future__ import annotations

import sys

from pipeline.chain.checks import probe_storage
from pipeline.chain.cli import chain_parser, load_chain_config
from pipeline.chain.official import import_official_tokenizer
from pipeline.core.job_cli import run_job


def main(argv: list[str] | None = None) -> int:
    parser = chain_parser("import_tokenizer", __doc__)
    parser.add_argument("--checkpoint", required=True, help="official tokenizer state dict (.pth), a local file")
    args = parser.parse_args(argv)

    def action() -> dict:
        config = load_chain_config(args)
        probe_storage(config.storage.root)
        if args.dry_run:
            return {"dry_run": True, "checkpoint": args.checkpoint}
        return import_official_tokenizer(config, args.checkpoint)

    return run_job("import_tokenizer", action)


if __name__ == "__main__":
    sys.exit(main())
