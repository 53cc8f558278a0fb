"""Bad-sample bookkeeping shared by every reader task: a small named Ray actor.

In `skip` mode each reader task sends the samples it dropped (shard, key, reason) here; the
driver (or the training stage, after `fit()`) asks for a summary. A sample skipped again in a
later epoch is counted once. In `fail` mode nothing is recorded: the first bad sample stops the
job with `BadSampleError`, one line naming shard and key.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import ray

from pipeline.core.errors import VarrayError, expected_error_in

logger = logging.getLogger(__name__)

WHOLE_SHARD = "*"  # key of a record that stands for a whole shard (missing, truncated, empty)


class BadSampleError(VarrayError, ValueError):
    """A bad sample (or shard) in `fail` mode; the message is one line naming shard and key."""


def describe(shard: str, key: str, reason: str) -> str:
    where = f"shard {shard}" if key == WHOLE_SHARD else f"shard {shard} key {key}"
    return f"bad sample: {where}: {reason}"


def find_bad_sample_error(exc: BaseException) -> BadSampleError | None:
    """The BadSampleError inside whatever Ray wrapped it in (RayTaskError, UserCodeException...)."""
    found = expected_error_in(exc)
    return found if isinstance(found, BadSampleError) else None


@dataclass
class BadSampleSummary:
    skipped_samples: int = 0  # distinct samples dropped from inside readable shards
    skipped_shards: int = 0  # whole shards left out (missing, truncated, empty)
    samples_in_skipped_shards: int = 0  # what the index says those shards held
    by_reason: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)  # first few culprits

    @property
    def clean(self) -> bool:
        return self.skipped_samples == 0 and self.skipped_shards == 0

    def __str__(self) -> str:
        if self.clean:
            return "bad samples: none"
        lines = [f"bad samples: skipped {self.skipped_samples} samples and {self.skipped_shards} shards "
                 f"({self.samples_in_skipped_shards} samples in them)"]
        lines += [f"  {count} x {reason}" for reason, count in sorted(self.by_reason.items())]
        lines += [f"  e.g. {describe(e['shard'], e['key'], e['reason'])}" for e in self.examples]
        return "\n".join(lines)


@dataclass(frozen=True)
class SkipBudget:
    """How much of a split a job may lose to bad samples (skipped samples, samples inside skipped
    shards) before it fails: `data.max_skipped_fraction` of what the index promises."""

    identity: str  # the dataset's bad-sample log (pipeline.data.reader)
    shards_uri: str
    total: int  # samples the split's index promises
    max_fraction: float

    def report(self) -> dict[str, Any]:
        """What was skipped so far, for a JSON line, chain.json and an export's config.json."""
        summary = summary_for(self.identity)
        lost = summary.skipped_samples + summary.samples_in_skipped_shards
        return {"samples": self.total, "skipped_samples": summary.skipped_samples,
                "skipped_shards": summary.skipped_shards,
                "samples_in_skipped_shards": summary.samples_in_skipped_shards,
                "lost_fraction": round(lost / max(self.total, 1), 6)}

    def exceeded(self) -> str | None:
        """One line if more than `max_fraction` was lost, else None."""
        report = self.report()
        if report["lost_fraction"] <= self.max_fraction:
            return None
        return (f"bad samples: {self.shards_uri} lost {report['skipped_samples']} samples and "
                f"{report['skipped_shards']} shards ({report['samples_in_skipped_shards']} samples in them) of "
                f"{self.total}, {report['lost_fraction']:.2%} > data.max_skipped_fraction {self.max_fraction}")


@ray.remote(num_cpus=0)
class BadSampleLog:
    """Distinct (shard, key) -> reason, plus samples lost with whole shards."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], tuple[str, int]] = {}

    def add(self, records: list[tuple[str, str, str, int]]) -> None:
        for shard, key, reason, samples in records:
            self.records.setdefault((shard, key), (reason, samples))

    def summary(self) -> BadSampleSummary:
        summary = BadSampleSummary()
        reasons: Counter[str] = Counter()
        for (shard, key), (reason, samples) in sorted(self.records.items()):
            if key == WHOLE_SHARD:
                summary.skipped_shards += 1
                summary.samples_in_skipped_shards += samples
            else:
                summary.skipped_samples += 1
            # The reason's first words name its kind ("label 12 outside..." -> counted per text up to digits).
            reasons[_reason_kind(reason)] += 1
            if len(summary.examples) < 20:
                summary.examples.append({"shard": shard, "key": key, "reason": reason})
        summary.by_reason = dict(reasons)
        return summary


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0]


def log_name(identity: str) -> str:
    return "varray-bad-samples-" + hashlib.sha1(identity.encode()).hexdigest()[:16]


def get_log(identity: str):
    """The named log actor for one dataset identity, created on first use (driver side)."""
    return BadSampleLog.options(name=log_name(identity), get_if_exists=True, lifetime=None).remote()


def summary_for(identity: str) -> BadSampleSummary:
    try:
        actor = ray.get_actor(log_name(identity))
    except ValueError:
        return BadSampleSummary()
    return ray.get(actor.summary.remote())


def record(log, records: list[tuple[str, str, str, int]]) -> None:
    """Log each culprit here (worker log) and count it in the shared actor."""
    for shard, key, reason, _ in records:
        logger.warning("skipped %s", describe(shard, key, reason))
    if log is not None and records:
        ray.get(log.add.remote(records))
