"""What every job CLI shares: the one job runner (known errors as one line) and the config loader."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import yaml
from pydantic import BaseModel

from pipeline.core.configuration import ConfigT, load_config
from pipeline.core.console import quiet_console
from pipeline.core.errors import VarrayError, expected_error_in


class _ConfigPrinted(Exception):
    """--print-config: the job stops once its config is resolved (run_job prints it)."""

    def __init__(self, config: BaseModel) -> None:
        super().__init__("config printed")
        self.config = config


def load_job_config(model: type[ConfigT], args: argparse.Namespace, extra: dict[str, Any] | None = None) -> ConfigT:
    """The job's config from --config, `extra` (its own flags) and --set; with --print-config the job
    prints it (every field, defaults included) and stops there."""
    config = load_config(model, args.config, args.overrides, extra=extra)
    if getattr(args, "print_config", False):
        raise _ConfigPrinted(config)
    return config


def run_job(prog: str, action: Callable[[], dict[str, Any]]) -> int:
    """Run `action`, print its result as one JSON line; a known failure (a `VarrayError`) is one line on
    stderr, `<prog>: <message>`, and exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_console()
    try:
        result = action()
    except _ConfigPrinted as printed:
        print(yaml.safe_dump(printed.config.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    except VarrayError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        expected = expected_error_in(exc)  # raised inside a Ray task or worker: its line, not the wrapper
        if expected is None:
            raise
        print(f"{prog}: {expected}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0
