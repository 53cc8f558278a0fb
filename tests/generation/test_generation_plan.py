"""The plan: keys, seeds and units are a pure function of the plan; bad plans name the problem."""

from __future__ import annotations

import pytest

from pipeline.core.configuration import ConfigError, load_config
from pipeline.generation.config import GenerateConfig
from pipeline.generation.plan import PlanError, build_units, resolve_counts, sample_seed

NAMES = ["T-shirt/top", "Trouser", "Bag"]


def test_units_cover_the_plan_in_fixed_size_named_chunks():
    units = build_units({0: 5, 2: 3}, plan_seed=7, unit_size=3)
    assert [u.name for u in units] == ["part-000000", "part-000001", "part-000002"]
    assert [len(u) for u in units] == [3, 3, 2]
    keys = [k for u in units for k in u.keys]
    assert len(set(keys)) == 8
    assert [label for u in units for label in u.labels] == [0] * 5 + [2] * 3
    assert units == build_units({0: 5, 2: 3}, plan_seed=7, unit_size=3)  # same plan, same units


def test_sample_seeds_depend_only_on_plan_seed_label_and_index():
    small = build_units({0: 2, 1: 2}, plan_seed=1, unit_size=10)[0]
    large = build_units({0: 4, 1: 2}, plan_seed=1, unit_size=10)[0]
    by_key_small = dict(zip(small.keys, small.seeds))
    by_key_large = dict(zip(large.keys, large.seeds))
    assert all(by_key_large[key] == seed for key, seed in by_key_small.items())
    assert sample_seed(1, 0, 0) != sample_seed(2, 0, 0) != sample_seed(1, 1, 0)
    assert 0 <= sample_seed(123, 9, 10**6) < 2**63


def test_counts_from_names_or_indices():
    assert resolve_counts(None, {"Bag": 4, "1": 2}, NAMES) == {1: 2, 2: 4}
    assert resolve_counts(3, None, NAMES) == {0: 3, 1: 3, 2: 3}


@pytest.mark.parametrize("classes, message", [
    ({"Sock": 1}, "unknown class 'Sock'"),
    ({"3": 1}, "unknown class '3'"),
    ({"Bag": 1, "2": 1}, "listed twice"),
    ({"Bag": -1}, "count must be >= 0"),
])
def test_bad_class_lists_are_refused(classes, message):
    with pytest.raises(PlanError, match=message) as info:
        resolve_counts(None, classes, NAMES)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, message", [
    (["plan.per_class=-2"], "config error: plan.per_class: Input should be greater than or equal to 0 (got -2)"),
    (["plan.classes={Bag: -1}"], "config error: plan.classes.Bag: Input should be greater than or equal to 0"),
    (["plan.per_class=2", "plan.classes={Bag: 1}"], "config error: plan: give exactly one of"),
    (["plan.per_class=2", "plan.unit_size=0"], "config error: plan.unit_size"),
])
def test_bad_counts_are_config_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(GenerateConfig, None, ["model.run=r", "output.uri=o", *overrides])
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
