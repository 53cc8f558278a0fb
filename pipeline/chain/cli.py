"""The chain's command line: the flags train_var, train_tokenizer, train_gpt and precompute_tokens share,
and their config (`TrainVarConfig`) from --config, those flags and --set."""

from __future__ import annotations

import argparse
import dataclasses
import posixpath

from pipeline.chain.config import TrainVarConfig
from pipeline.core.configuration import ConfigError, add_config_arguments
from pipeline.core.job_cli import load_job_config, run_job
from pipeline.core.storage import absolute_uri


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


def load_chain_config(args: argparse.Namespace) -> TrainVarConfig:
    return load_job_config(TrainVarConfig, args, extra={
        "storage.root": args.storage, "storage.run_name": args.run_name, **_resume_overrides(args.resume),
        "tokenizer.report_to": args.report_to, "gpt.report_to": args.report_to})


def run_step_job(prog: str, step: str, args: argparse.Namespace, moved: dict[str, str | None] | None = None) -> int:
    """A stage job: one chain step with the chain's config and layout; `moved` points some of the
    layout's locations elsewhere (e.g. {"tokenizer_export": args.tokenizer}; None keeps the run's).
    --dry-run checks it; a finished step is skipped unless --force names it."""
    from pipeline.chain.run import plan_step, run_step

    def action() -> dict:
        config = load_chain_config(args)
        # Flags outside the config are made absolute here, like the config's own locations.
        layout = dataclasses.replace(config.layout, **{field: absolute_uri(uri)
                                                       for field, uri in (moved or {}).items() if uri})
        if args.dry_run:
            return {"dry_run": True, **plan_step(config, step, layout=layout)}
        return run_step(config, step, layout=layout, force=step in args.force)

    return run_job(prog, action)
