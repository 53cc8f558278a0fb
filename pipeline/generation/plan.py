"""The generation plan: (key, label, seed) triples, split into fixed-size work units with fixed names.

A sample's key and seed depend only on (plan seed, label, index within its class), so growing one
class's count adds samples without changing any existing one. Units take the samples in (label,
index) order, `unit_size` at a time, and are named `part-000000`, `part-000001`, ...: the same plan
always gives the same units, which is what lets a rerun skip the finished ones.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.errors import VarrayError


class PlanError(VarrayError, ValueError):
    """The plan cannot be carried out; the message is one line naming the problem."""


@dataclass(frozen=True)
class WorkUnit:
    """One output file's worth of samples."""

    name: str
    keys: tuple[str, ...]
    labels: tuple[int, ...]
    seeds: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.keys)

    def to_row(self) -> dict[str, Any]:
        return {"name": self.name, "keys": list(self.keys), "labels": list(self.labels), "seeds": list(self.seeds)}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> WorkUnit:
        return cls(str(row["name"]), tuple(str(k) for k in row["keys"]), tuple(int(v) for v in row["labels"]),
                   tuple(int(v) for v in row["seeds"]))


def unit_name(number: int) -> str:
    return f"part-{number:06d}"


def sample_key(label: int, index: int) -> str:
    # No dots or slashes: the key is also a WebDataset key.
    return f"c{label:04d}_{index:07d}"


def sample_seed(plan_seed: int, label: int, index: int) -> int:
    """A 63-bit seed from (plan seed, label, index) through numpy's SeedSequence hash: stable everywhere."""
    words = np.random.SeedSequence([plan_seed, label, index]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1)


def resolve_counts(per_class: int | None, classes: Mapping[str, int] | None,
                   class_names: Sequence[str]) -> dict[int, int]:
    """{label: count} from `per_class` or {class name or index: count}; unknown classes are a PlanError."""
    if per_class is not None:
        if per_class < 0:
            raise PlanError(f"plan.per_class: count must be >= 0 (got {per_class})")
        return {label: per_class for label in range(len(class_names))}
    counts: dict[int, int] = {}
    for name, count in (classes or {}).items():
        label = _class_index(str(name), class_names)
        if count < 0:
            raise PlanError(f"plan.classes.{name}: count must be >= 0 (got {count})")
        if label in counts:
            raise PlanError(f"plan.classes.{name}: class {label} ({class_names[label]}) is listed twice")
        counts[label] = int(count)
    return dict(sorted(counts.items()))


def _class_index(name: str, class_names: Sequence[str]) -> int:
    if name in class_names:
        return list(class_names).index(name)
    if name.lstrip("-").isdigit():
        label = int(name)
        if 0 <= label < len(class_names):
            return label
    known = ", ".join(f"{i}={n}" for i, n in enumerate(class_names))
    raise PlanError(f"plan.classes: unknown class {name!r}; the model has {len(class_names)} classes: {known}")


def build_units(counts: Mapping[int, int], plan_seed: int, unit_size: int) -> list[WorkUnit]:
    samples = [(sample_key(label, index), label, sample_seed(plan_seed, label, index))
               for label, count in sorted(counts.items()) for index in range(count)]
    units = []
    for number, start in enumerate(range(0, len(samples), unit_size)):
        chunk = samples[start:start + unit_size]
        keys, labels, seeds = zip(*chunk)
        units.append(WorkUnit(unit_name(number), keys, labels, seeds))
    return units


def plan_fingerprint(description: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that decides the output bytes."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
