"""What every job CLI shares: the one job runner (known errors as one line), the chain's flags and config."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from pipeline.bad_samples import find_bad_sample_error
from pipeline.chain_config import TrainVarConfig
from pipeline.configuration import add_config_arguments, load_config
from pipeline.errors import VarrayError


def chain_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--storage", metavar="URI", help="where runs live: a local folder (default ./runs) or "
                                                           "s3://bucket/prefix (sets storage.root)")
    parser.add_argument("--run-name", metavar="NAME", help="the run's folder under --storage (sets storage.run_name)")
    return parser


def load_chain_config(args: argparse.Namespace) -> TrainVarConfig:
    return load_config(TrainVarConfig, args.config, args.overrides,
                       extra={"storage.root": args.storage, "storage.run_name": args.run_name})


def run_job(prog: str, action: Callable[[], dict[str, Any]]) -> int:
    """Run `action`, print its result as one JSON line; a known failure (a `VarrayError`) is one line on
    stderr, `<prog>: <message>`, and exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = action()
    except VarrayError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        bad_sample = find_bad_sample_error(exc)  # raised inside a Ray task: name the sample, not the wrapper
        if bad_sample is None:
            raise
        print(f"{prog}: {bad_sample}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0
