"""README's own commands as a new user runs them: from a fresh working directory holding a copy of the
repository, on the default relative storage (./runs, ./data), with only the sizes made tiny.

Ray runs its workers and actors in a folder of its own, so a relative location that reached a worker
would land (or be looked for) there: every output must be where README says, under the working
directory, and nowhere else.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Only the sizes change: a few real images, two steps per stage, a handful of images to judge.
TINY_DEMO = [
    "--set", "data.create.limit=128", "--set", "data.create.samples_per_shard=64",
    "--set", "tokenizer.steps=2", "--set", "tokenizer.warmup_steps=1", "--set", "tokenizer.checkpoint_every=2",
    "--set", "tokenizer.log_every=1",
    "--set", "gpt.steps=2", "--set", "gpt.warmup_steps=1", "--set", "gpt.checkpoint_every=2", "--set", "gpt.log_every=1",
    "--set", "cache.batch_size=64", "--set", "sample.per_class=1",
    "--per-class", "2", "--fid-samples", "8", "--feature-samples", "16", "--reconstruction-samples", "8",
]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def readme_demo_command() -> list[str]:
    """The demo command of README's first code block, after its set-up step, with this interpreter."""
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL).group(1)
    line = next(line for line in block.splitlines() if "jobs/demo.py" in line)
    command = shlex.split(line.split("#", 1)[0].split("&&", 1)[1])
    assert command[0] == ".venv/bin/python", command
    return [sys.executable, *command[1:]]


def _run(command: list[str], cwd: Path, timeout: int = 900, console: list[str] | None = None) -> dict:
    """The command's JSON line; its stderr lines go to `console` when given."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_ADDRESS")}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\nstderr tail:\n{result.stderr[-4000:]}"
    if console is not None:
        console += result.stderr.splitlines()
    return json.loads(result.stdout.strip().splitlines()[-1])


def _check_console(lines: list[str], stages: dict[str, int], steps: int) -> None:
    """At most one line per logged interval per stage (rank 0), plus a short header and summary per step.

    Ray Train's controller reports its own environment trouble (e.g. a traceback when several Ray
    clusters run on one machine, as in this test session); those lines are Ray's, not counted here."""
    intervals = [line for line in lines if re.search(r"\[(tokenizer|gpt)\] step \d+/\d+", line)]
    for stage, count in stages.items():
        assert sum(f"[{stage}] step " in line for line in intervals) == count, (stage, intervals)
    rays_own = [line for line in lines if "(TrainController pid=" in line or "(PlacementGroupCleaner pid=" in line]
    rest = [line for line in lines if line not in intervals and line not in rays_own]
    assert len(rest) <= 6 * steps + 4, "\n".join(rest)
    assert not any("Warning" in line for line in rest), "\n".join(rest)


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> Path:
    """A copy of the repository (what a clone holds), as the working directory of every command."""
    folder = tmp_path_factory.mktemp("user") / "varray"
    shutil.copytree(REPO, folder, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "data", "__pycache__", "*.egg-info", ".pytest_cache"))
    return folder


@pytest.fixture(scope="module")
def demo_console() -> list[str]:
    return []


@pytest.fixture(scope="module")
def demo_summary(user_folder, demo_console) -> dict:
    return _run(readme_demo_command() + TINY_DEMO, user_folder, console=demo_console)


def test_the_demo_writes_every_output_where_readme_says(user_folder, demo_summary, demo_console):
    # Its chain logs each stage's intervals on rank 0 only: 2 steps, logged every step. Generation and
    # evaluation after it show progress bars and the classifier's epochs, bounded by their own sizes.
    training = demo_console[:next(i for i, line in enumerate(demo_console) if "demo 2/3" in line)]
    _check_console(training, {"tokenizer": 2, "gpt": 2}, steps=len(demo_summary["steps"]["train"]["steps"]))
    assert not any("Warning" in line for line in demo_console), "\n".join(demo_console)
    run = user_folder / "runs" / "fashion_mnist"
    assert demo_summary["run"] == str(run)
    for relative in ("tokenizer/export/config.json", "tokenizer/export/model.safetensors",
                     "token_cache/_SUCCESS.json", "gpt/export/config.json", "samples.png", "chain.json",
                     "generated/plan.json", "eval/metrics.json", "demo.json"):
        assert (run / relative).is_file(), relative
    for split in ("train", "test"):
        assert (user_folder / "data" / "fashion_mnist_32" / split / "index.json").is_file()
    figures = json.loads((run / "eval" / "metrics.json").read_text())
    assert figures["images"] == 20 and figures["generated"] == str(run / "generated")
    # What the run recorded names the user's folder, never Ray's.
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["storage"]["root"] == str(user_folder / "runs")
    assert recorded["data"]["train"]["shards_uri"] == str(user_folder / "data" / "fashion_mnist_32" / "train")


def test_every_job_takes_relative_locations(user_folder, demo_summary):
    """make_shards, precompute_tokens, generate_dataset and evaluate, each with relative paths, on the
    demo's run (the demo itself is train_var's chain on README's relative defaults)."""
    python = sys.executable
    shards = _run([python, "jobs/make_shards.py", "--source", "fashion-mnist", "--output", "my_shards",
                   "--split", "train", "--image-size", "16", "--limit", "64", "--samples-per-shard", "32"], user_folder)
    assert shards["output"] == str(user_folder / "my_shards")
    assert (user_folder / "my_shards" / "train" / "index.json").is_file()

    demo_sets = [arg for flag, arg in zip(TINY_DEMO, TINY_DEMO[1:]) if flag == "--set"]
    overrides = [part for value in demo_sets for part in ("--set", value)]
    cache = _run([python, "jobs/precompute_tokens.py", "--config", "configs/fashion_mnist.yaml", *overrides,
                  "--output", "my_cache"], user_folder)
    assert cache["outputs"]["token_cache"] == str(user_folder / "my_cache")
    assert (user_folder / "my_cache" / "_SUCCESS.json").is_file()

    generated = _run([python, "jobs/generate_dataset.py", "--run", "runs/fashion_mnist", "--output", "my_set",
                      "--per-class", "1"], user_folder)
    assert generated["output"] == str(user_folder / "my_set")
    assert (user_folder / "my_set" / "plan.json").is_file()

    # Judged against the run's own validation split (Fashion-MNIST's test split, as the demo wrote it).
    figures = _run([python, "jobs/evaluate.py", "--run", "runs/fashion_mnist", "--generated", "my_set",
                    "--output", "my_eval", "--set", "fid.samples=4", "--set", "features.samples=4",
                    "--set", "reconstruction.samples=4", "--set", "classifier.train_samples=128"], user_folder)
    assert figures["generated"] == str(user_folder / "my_set")
    assert (user_folder / "my_eval" / "metrics.json").is_file()
