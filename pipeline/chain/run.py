"""Walk the chain's table of steps (pipeline.chain.steps): plan what each step does on this run
(pipeline.chain.resume), run or resume them in order, and record what each did in `<run>/chain.json`.

A step whose output is finished is skipped (its marker: an export's config.json, the cache's
_SUCCESS.json, the PNG), so running the same command again resumes where a killed run stopped;
inside a stage, Ray Train resumes from the newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Callable

from pipeline.chain.checks import ChainError, check_data, ensure_shards, probe_storage
from pipeline.chain.config import TrainVarConfig
from pipeline.chain.resume import StepPlan, changed_fields, plan_steps
from pipeline.chain.steps import STEPS, Step, chain_steps, step_named
from pipeline.core.layout import RunLayout
from pipeline.core.ray_runtime import connect_ray
from pipeline.core.storage import StorageOptions, exists, move_aside, read_bytes, write_bytes_atomic
from pipeline.train.config import TokenizerStageConfig

logger = logging.getLogger(__name__)


def step_status(steps: Sequence[Step], layout: RunLayout, storage: StorageOptions | None = None) -> dict[str, bool]:
    """Which of `steps` are already done (their marker exists)."""
    return {step.name: step.is_done(layout, storage) for step in steps}


def _config_changes(config: TrainVarConfig, layout: RunLayout,
                    storage: StorageOptions | None) -> dict[str, tuple[Any, Any]]:
    """How this config differs from the one the run's finished steps were made with."""
    if not exists(layout.config, storage):
        return {}
    try:
        recorded = json.loads(read_bytes(layout.config, storage))
    except ValueError:
        raise ChainError(f"{layout.config}: not JSON; move it aside to start the run's record anew") from None
    return changed_fields(recorded, config.model_dump(mode="json"))


def _record_config(config: TrainVarConfig, layout: RunLayout, storage: StorageOptions | None) -> None:
    write_bytes_atomic(layout.config, json.dumps(config.model_dump(mode="json"), indent=2).encode(), storage)


def _plans(config: TrainVarConfig, steps: Sequence[Step], layout: RunLayout, storage: StorageOptions | None,
           force: Sequence[str]) -> dict[str, StepPlan]:
    return plan_steps(steps, _config_changes(config, layout, storage), step_status(steps, layout, storage), force)


_LABEL = {"skip": "skip (output exists)"}
_STATUS = {"run": "ran", "rerun": "reran", "extend": "extended"}


def plan_chain(config: TrainVarConfig, storage: StorageOptions | None = None, probe: bool = True,
               force: Sequence[str] = ()) -> dict[str, Any]:
    """Everything --dry-run checks, without starting Ray or training: storage, data, what each step
    would do (run, skip, extend, rerun; a changed config that a finished step cannot take is refused)."""
    if probe:
        probe_storage(config.storage.root, storage)
    data = check_data(config, storage)
    layout = config.layout
    steps = chain_steps(config)
    plans = _plans(config, steps, layout, storage, force)
    if plans["tokenizer"].action != "skip":
        check_weights_files(config.tokenizer)
    return {"run": layout.run, "data": data, "outputs": asdict(layout),
            "steps": {step.name: _describe(plans[step.name]) for step in steps},
            "needs": {step.name: asdict(step.needs(config)) for step in steps}}


def _describe(plan: StepPlan) -> str:
    return _LABEL.get(plan.action, plan.action) + (f" ({', '.join(plan.changed)})" if plan.changed else "")


def _timed(steps: dict[str, Any], step: Step, plan: StepPlan, action: Callable[[], Any], layout: RunLayout,
           storage: StorageOptions | None) -> None:
    name = step.name
    if plan.action == "skip":
        logger.info("step %s: output exists, skipped", name)
        steps[name] = {"status": "skipped"}
        return
    record: dict[str, Any] = {"status": _STATUS[plan.action]}
    if plan.changed:
        record["changed"] = list(plan.changed)
    if plan.action == "rerun":  # made afresh: the old output is kept aside, not deleted
        record["replaced"] = move_aside(step.made(layout), storage)
    logger.info("step %s: %s", name, {"run": "running", "rerun": "running afresh",
                                      "extend": f"extending ({', '.join(plan.changed)})"}[plan.action])
    started = time.time()
    details = action() or {}
    steps[name] = {**record, "seconds": round(time.time() - started, 1), **details}
    logger.info("step %s: done in %.1f s", name, steps[name]["seconds"])


def check_weights_files(config: TokenizerStageConfig) -> None:
    """The tokenizer's weights files (LPIPS, DINO) exist, else one line naming the field and the file."""
    missing = config.missing_weights_file()
    if missing is not None:
        raise ChainError(f"config error: tokenizer.{missing}")


def chain_cpus(config: TrainVarConfig) -> float:
    """Logical CPUs the largest step of the chain reserves at once."""
    return max(step.needs(config).cpus for step in chain_steps(config))


def run_chain(config: TrainVarConfig, storage: StorageOptions | None = None,
              force: Sequence[str] = ()) -> dict[str, Any]:
    """Run (or resume) every step; returns the summary also written to `<run>/chain.json`.

    A rerun keeps each finished step unless its config changed (pipeline.chain.resume): more
    training steps extend a stage, other changes are refused unless the step is in `force`."""
    started = time.time()
    layout = config.layout
    plan_chain(config, storage, probe=True, force=force)  # fail early, before Ray starts
    steps = chain_steps(config)
    plans = _plans(config, steps, layout, storage, force)
    if not exists(layout.config, storage):
        _record_config(config, layout, storage)
    connect_ray(chain_cpus(config), config.relative_locations)
    record: dict[str, Any] = {"shards": {"status": "ran" if ensure_shards(config, storage) else "skipped"}}
    for step in steps:
        _timed(record, step, plans[step.name], lambda step=step: step.run(config, layout, storage), layout, storage)
    _record_config(config, layout, storage)  # every step is now made with this config
    summary = {"run": layout.run, "outputs": asdict(layout), "steps": record,
               "seconds": round(time.time() - started, 1)}
    write_bytes_atomic(layout.summary, json.dumps(summary, indent=2).encode(), storage)
    return summary


def plan_step(config: TrainVarConfig, name: str, storage: StorageOptions | None = None,
              layout: RunLayout | None = None) -> dict[str, Any]:
    """--dry-run of one step: storage reachable, its inputs finished (or the data for the first steps)."""
    layout = layout or config.layout
    step = step_named(name)
    probe_storage(config.storage.root, storage)
    plan: dict[str, Any] = {"step": name, "outputs": asdict(layout), "needs": asdict(step.needs(config))}
    if name in ("tokenizer", "token_cache"):
        plan["data"] = check_data(config, storage)
    if name == "tokenizer" and not step.is_done(layout, storage):
        check_weights_files(config.tokenizer)
    for field in step.inputs:
        maker = next(other for other in STEPS if other.output == field)
        if not maker.is_done(layout, storage):
            raise ChainError(f"{field}: {getattr(layout, field)} is missing or incomplete; run the step that "
                             f"makes it first ({maker.name})")
    plan["status"] = "skip (output exists)" if step.is_done(layout, storage) else "run"
    return plan


def run_step(config: TrainVarConfig, name: str, storage: StorageOptions | None = None,
             layout: RunLayout | None = None, force: bool = False) -> dict[str, Any]:
    """Run one step alone (the stage jobs), with the chain's layout unless `layout` moves its inputs/output.
    A finished step is skipped, or made afresh with `force` (its old output moved aside)."""
    layout = layout or config.layout
    step = step_named(name)
    plan_step(config, name, storage, layout)
    # The step alone, judged like the chain judges it (more steps extend it, other changes are refused).
    plan = _plans(config, [step], layout, storage, [name] if force else [])[name]
    if not exists(layout.config, storage):
        _record_config(config, layout, storage)
    connect_ray(step.needs(config).cpus, config.relative_locations)
    if name == "tokenizer":
        ensure_shards(config, storage)
    record: dict[str, Any] = {}
    _timed(record, step, plan, lambda: step.run(config, layout, storage), layout, storage)
    return {"step": name, "outputs": asdict(layout), **record[name]}


__all__ = ["plan_chain", "run_chain", "plan_step", "run_step", "step_status", "chain_cpus"]
