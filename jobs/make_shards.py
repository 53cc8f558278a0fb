"""Write WebDataset shards (+ index.json per split) from Fashion-MNIST or an ImageNet-style folder.

Examples:
  python -m jobs.make_shards --source fashion-mnist --output data/fmnist
  python -m jobs.make_shards --source fashion-mnist --output s3://bucket/fmnist --val-fraction 0.1
  python -m jobs.make_shards --source folder --input ~/imagenet/train --image-size 256 --output s3://b/in256 \
      --labels imagenet_class_index.json --workers 16

A folder's shards are written in parallel (one task per shard) and, run again, finished shards are
kept: each shard's <prefix>-NNNNNN.stats.json is its commit marker.

Output: <output>/<split>/<prefix>-000000.tar ... and <output>/<split>/index.json.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.core.configuration import add_config_arguments
from pipeline.core.errors import VarrayError
from pipeline.core.job_cli import load_job_config, run_job
from pipeline.data.sharding import MakeShardsConfig, SourceError, make_shards, plan, refused_images


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--source", choices=["fashion-mnist", "folder"], help="where the images come from")
    parser.add_argument("--input", help="Fashion-MNIST IDX folder (default: the Debian package's) or image folder")
    parser.add_argument("--output", help="output URI: a local folder or s3://bucket/prefix")
    parser.add_argument("--image-size", type=int, help="square side in pixels (resize short side + center crop)")
    parser.add_argument("--channels", type=int, choices=[1, 3], help="1 = gray, 3 = RGB")
    parser.add_argument("--split", dest="splits", action="append",
                        help="source split to write (repeatable): train, test (Fashion-MNIST); default all")
    parser.add_argument("--val-fraction", type=float, help="carve a 'validation' split from train (0 <= f < 1)")
    parser.add_argument("--samples-per-shard", type=int, help="samples per tar shard (default 1000)")
    parser.add_argument("--prefix", help="shard file name prefix (default 'shard')")
    parser.add_argument("--limit", type=int, help="at most this many samples per split (tests, demos)")
    parser.add_argument("--seed", type=int, help="seed of the split/write-order permutation (default 0)")
    parser.add_argument("--max-image-pixels", type=int,
                        help="folder: refuse (and count) images with more pixels (default 89478485, PIL's)")
    parser.add_argument("--labels", help="folder: label manifest, JSON or CSV (folder -> class id and name); "
                                          "default: class i is the i-th sorted folder name")
    parser.add_argument("--workers", type=int, help="folder: processes writing shards (default: this machine's CPUs)")
    parser.add_argument("--no-keep-jpeg", dest="keep_jpeg", action="store_const", const=False,
                        help="folder: re-encode every image as PNG (default: a JPEG needing no resize or "
                             "conversion keeps its bytes, stored as .jpg)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = {name: getattr(args, name) for name in (
        "source", "input", "output", "image_size", "channels", "splits", "val_fraction", "samples_per_shard",
        "prefix", "limit", "seed", "max_image_pixels", "labels", "workers", "keep_jpeg")}

    def action() -> dict:
        config = load_job_config(MakeShardsConfig, args, extra=flags)
        if args.dry_run:
            return {"dry_run": True, **plan(config)}
        try:
            indexes = make_shards(config)
        except (FileNotFoundError, ValueError) as exc:  # a source that is missing or not what it claims
            if isinstance(exc, VarrayError):
                raise
            raise SourceError(str(exc)) from exc
        return {"output": config.output, "splits": {
            name: {"samples": index.total, "shards": len(index.shards), "refused": refused_images(index)}
            for name, index in indexes.items()}}

    return run_job("make_shards", action)

if __name__ == "__main__":
    sys.exit(main())
