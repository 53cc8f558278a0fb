"""What every job CLI shares: the one job runner (known errors as one line), the chain's flags and config."""

from __future__ import annotations

import argparse
import json
import logging
import posixpath
import sys
from collections.abc import Callable
from typing import Any

import yaml
from pydantic import BaseModel

from pipeline.chain_config import TrainVarConfig
from pipeline.configuration import ConfigError, ConfigT, add_config_arguments, load_config
from pipeline.console import quiet_console
from pipeline.errors import VarrayError, expected_error_in


def chain_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--storage", metavar="URI", help="where runs live: a local folder (default ./runs) or "
                                                           "s3://bucket/prefix (sets storage.root)")
    parser.add_argument("--run-name", metavar="NAME", help="the run's folder under --storage (sets storage.run_name)")
    parser.add_argument("--resume", metavar="latest|none|URI",
                        help="latest (default): continue each stage from its newest checkpoint; none: start the "
                             "stages that run at step 0 (old runs moved aside); or a checkpoint URI "
                             "(<run>/tokenizer/step_* or <run>/gpt/step_*) to start that stage from")
    parser.add_argument("--report-to", metavar="LIST",
                        help="where the stages' metrics go as they are logged: tensorboard,csv (default), wandb, none "
                             "(sets tokenizer.report_to and gpt.report_to)")
    parser.add_argument("--force", metavar="STEP", action="append", default=[],
                        help="make STEP again, and the steps after it, even if it is finished (its old output is "
                             "moved aside); repeatable")
    return parser


def _resume_overrides(resume: str | None) -> dict[str, str | None]:
    """--resume as the stages' `resume` fields: a keyword for both, a checkpoint for the stage it is of."""
    if resume in (None, "latest", "none"):
        return {"tokenizer.resume": resume, "gpt.resume": resume}
    stage = posixpath.basename(posixpath.dirname(str(resume).replace("\\", "/").rstrip("/")))
    if stage not in ("tokenizer", "gpt"):
        raise ConfigError(f"config error: --resume: {resume} is not a checkpoint of a varray stage "
                          "(<run>/tokenizer/step_* or <run>/gpt/step_*); set tokenizer.resume or gpt.resume instead")
    return {f"{stage}.resume": resume}


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


def load_chain_config(args: argparse.Namespace) -> TrainVarConfig:
    return load_job_config(TrainVarConfig, args, extra={
        "storage.root": args.storage, "storage.run_name": args.run_name, **_resume_overrides(args.resume),
        "tokenizer.report_to": args.report_to, "gpt.report_to": args.report_to})


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
