"""What a rerun of the chain does with each finished step, given how its config changed.

A run records its resolved config in `<run>/config.json`. Run again with a different config, each
finished step is judged on the fields it depends on:
- nothing relevant changed (or only bookkeeping such as log_every): skipped, as before;
- only the stage's `steps` went up: extended, resumed from its last checkpoint to the new budget;
- anything else: refused with the changed fields named, unless `--force STEP` reruns it afresh;
- a step after one that reran or was extended reruns afresh: its input changed.
A rerun afresh moves the step's old output aside (`<name>.replaced-<time>`), never deletes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pipeline.core.errors import VarrayError

# Fields that change how a step runs or reports, never what it makes.
BOOKKEEPING = frozenset({
    "log_every", "checkpoint_every", "keep_checkpoints", "max_failures", "report_to", "validate_every",
    "sample_every", "cpus_per_worker", "use_gpu", "placement_strategy", "decode_batch_size", "on_bad_sample",
    "batch_size", "concurrency", "num_cpus", "num_gpus", "resume", "workers", "index_cache"})

Action = Literal["run", "skip", "extend", "rerun"]


class JudgedStep(Protocol):
    """What the judgement reads of a step (pipeline.chain.steps.Step)."""

    name: str
    sections: tuple[str, ...]  # the config sections its output depends on (besides the steps before it)
    extendable: bool  # more training steps continue from its last checkpoint


class ChangedConfigError(VarrayError, ValueError):
    """A finished step's config changed in a way that would invalidate it; one line naming the fields."""


@dataclass(frozen=True)
class StepPlan:
    action: Action
    changed: tuple[str, ...] = ()  # the fields that decided it


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def changed_fields(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted field -> (recorded value, current value), for every field that differs."""
    old, new = flatten(recorded), flatten(current)
    return {path: (old.get(path), new.get(path)) for path in sorted(old.keys() | new.keys())
            if old.get(path) != new.get(path)}


def _relevant(step: JudgedStep, changes: Mapping[str, tuple[Any, Any]]) -> list[str]:
    return [path for path in changes
            if any(path == section or path.startswith(f"{section}.") for section in step.sections)
            and path.rsplit(".", 1)[-1] not in BOOKKEEPING]


def _describe(changes: Mapping[str, tuple[Any, Any]], fields: Iterable[str]) -> str:
    return ", ".join(f"{path} ({changes[path][0]!r} -> {changes[path][1]!r})" for path in fields)


def plan_steps(steps: Sequence[JudgedStep], changes: Mapping[str, tuple[Any, Any]], done: Mapping[str, bool],
               force: Iterable[str] = ()) -> dict[str, StepPlan]:
    """What each of `steps` (in chain order) does on this run, by name; ChangedConfigError when a finished
    step cannot be kept. `done`: which step names are finished."""
    force = set(force)
    names = [step.name for step in steps]
    unknown = force - set(names)
    if unknown:
        raise ChangedConfigError(f"--force: unknown step {sorted(unknown)[0]!r}, choose from {', '.join(names)}")
    plans: dict[str, StepPlan] = {}
    upstream_changed = False
    for judged in steps:
        step = judged.name
        relevant = _relevant(judged, changes)
        if not done[step]:
            plans[step] = StepPlan("run")  # made again from the same inputs: what follows stays valid
        elif step in force:
            plans[step] = StepPlan("rerun", tuple(relevant))
            upstream_changed = True
        elif upstream_changed:
            plans[step] = StepPlan("rerun", tuple(relevant))
        elif not relevant:
            plans[step] = StepPlan("skip")
        elif judged.extendable and relevant == [f"{step}.steps"] and _grew(changes[f"{step}.steps"]):
            plans[step] = StepPlan("extend", tuple(relevant))
            upstream_changed = True
        else:
            raise ChangedConfigError(
                f"{_describe(changes, relevant)} changed since step {step} finished, which would invalidate it: "
                f"rerun it with --force {step}, or start a new --run-name")
    return plans


def _grew(change: tuple[Any, Any]) -> bool:
    old, new = change
    return isinstance(old, int) and isinstance(new, int) and new > old


__all__ = ["JudgedStep", "StepPlan", "ChangedConfigError", "changed_fields", "flatten", "plan_steps"]
