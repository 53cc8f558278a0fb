"""Resume control: a finished stage extended by raising its steps, a changed config refused with the
changed fields named (or the step made again with --force), and --resume from a named checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.chain.resume import ChangedConfigError, changed_fields, plan_steps
from pipeline.chain.steps import step_named
from pipeline.core.storage import move_aside

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
STEPS = tuple(step_named(name) for name in ("tokenizer", "token_cache", "gpt", "samples"))
ALL_DONE = {step.name: True for step in STEPS}


def _config(**tokenizer) -> dict:
    return {"tokenizer": {"steps": 4, "log_every": 2, "base_learning_rate": 2e-4, **tokenizer},
            "gpt": {"steps": 4}, "cache": {"batch_size": 64}, "sample": {"cfg": 1.5}, "data": {"train": {"x": 1}}}


def test_bookkeeping_changes_keep_every_finished_step():
    changes = changed_fields(_config(), _config(log_every=1))
    assert changes == {"tokenizer.log_every": (2, 1)}
    assert {step: plan.action for step, plan in plan_steps(STEPS, changes, ALL_DONE).items()} == dict.fromkeys(
        ALL_DONE, "skip")


def test_more_steps_extend_the_stage_and_remake_what_follows():
    plans = plan_steps(STEPS, changed_fields(_config(), _config(steps=6)), ALL_DONE)
    assert [plans[step].action for step in ALL_DONE] == ["extend", "rerun", "rerun", "rerun"]
    assert plans["tokenizer"].changed == ("tokenizer.steps",)


def test_a_change_that_invalidates_a_finished_step_names_the_fields():
    changes = changed_fields(_config(), _config(base_learning_rate=1e-3, steps=3))
    with pytest.raises(ChangedConfigError) as error:
        plan_steps(STEPS, changes, ALL_DONE)
    assert str(error.value).startswith("tokenizer.base_learning_rate (0.0002 -> 0.001), tokenizer.steps (4 -> 3) "
                                       "changed since step tokenizer finished")
    assert "--force tokenizer" in str(error.value)
    plans = plan_steps(STEPS, changes, ALL_DONE, force=["tokenizer"])
    assert [plans[step].action for step in ALL_DONE] == ["rerun"] * 4
    with pytest.raises(ChangedConfigError, match="--force: unknown step 'tokeniser'"):
        plan_steps(STEPS, {}, ALL_DONE, force=["tokeniser"])


def test_move_aside_keeps_the_old_output(tmp_path):
    old = tmp_path / "run" / "tokenizer"
    (old / "export").mkdir(parents=True)
    (old / "export" / "config.json").write_text("{}")
    moved = Path(move_aside(str(old)))
    assert not old.exists() and (moved / "export" / "config.json").read_text() == "{}"
    assert moved.name.startswith("tokenizer.replaced-") and move_aside(str(old)) is None


def _train_tokenizer(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, str(REPO / "jobs" / "train_tokenizer.py"), "--config", TINY,
                           "--storage", "runs", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _export(cwd: Path, run: str) -> dict:
    return json.loads((cwd / "runs" / run / "tokenizer" / "export" / "config.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_extend_refuse_and_resume_from_a_named_checkpoint(tmp_path):
    first = _train_tokenizer(tmp_path, "--set", "tokenizer.checkpoint_every=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert _export(tmp_path, "tiny")["step"] == 4

    # A changed learning rate would invalidate the finished stage: refused before Ray starts, fields named.
    refused = _train_tokenizer(tmp_path, "--set", "tokenizer.base_learning_rate=1e-3")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(
        "train_tokenizer: tokenizer.base_learning_rate (0.0002 -> 0.001) changed since step tokenizer finished")

    # More steps: continued from the last checkpoint (step 4), not started again.
    extended = _train_tokenizer(tmp_path, "--set", "tokenizer.steps=6", "--set", "tokenizer.checkpoint_every=2")
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert json.loads(extended.stdout.strip().splitlines()[-1])["status"] == "extended"
    export = _export(tmp_path, "tiny")
    assert export["step"] == 6 and export["resumed_from"] == [4]

    # Another run started from a named checkpoint of the first (its step 4), not from step 0.
    checkpoint = tmp_path / "runs" / "tiny" / "tokenizer" / "step_00000004"
    assert checkpoint.is_dir()
    resumed = _train_tokenizer(tmp_path, "--run-name", "from_checkpoint", "--resume", str(checkpoint),
                               "--set", "tokenizer.steps=6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    export = _export(tmp_path, "from_checkpoint")
    assert export["step"] == 6 and export["resumed_from"] == [4]
