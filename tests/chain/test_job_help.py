"""Every job's --help: its examples use only flags the job accepts and name only configs that exist;
--print-config prints the resolved config; the console scripts of pyproject run the same jobs."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[2]
JOBS = sorted(p.stem for p in (REPO / "jobs").glob("*.py") if p.stem != "__init__")


def _examples(doc: str, job: str) -> list[list[str]]:
    """The example command lines of a job's docstring (continuations joined), as argument lists."""
    text = re.sub(r"\\\\?\n\s*", " ", doc)  # "\" (or "\\" in a non-raw docstring) continues a line
    commands = []
    for line in text.splitlines():
        match = re.search(rf"python (?:jobs/{job}\.py|-m jobs\.{job})(.*)", line)
        if match:
            commands.append(shlex.split(match.group(1).split("#", 1)[0]))
    return commands


@pytest.mark.parametrize("job", JOBS)
def test_help_examples_use_real_flags_and_configs(job, capsys):
    module = importlib.import_module(f"jobs.{job}")
    with pytest.raises(SystemExit) as exit_code:
        module.main(["--help"])
    assert exit_code.value.code == 0
    help_text = capsys.readouterr().out
    examples = _examples(module.__doc__, job)
    assert examples, f"jobs/{job}.py has no example in its help"
    for arguments in examples:
        for token in arguments:
            if token.startswith("--"):
                assert re.search(rf"(^|\s){re.escape(token.split('=')[0])}\b", help_text), f"{job}: {token}"
            if token.endswith(".yaml"):
                assert (REPO / token).is_file(), f"{job}: {token} does not exist"


def test_print_config_shows_every_field_with_its_default(capsys):
    from jobs import train_var
    from pipeline.chain.config import TrainVarConfig
    from pipeline.core.configuration import load_config

    assert train_var.main(["--config", str(REPO / "configs" / "tiny.yaml"), "--set", "gpt.steps=7",
                           "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_config(TrainVarConfig, REPO / "configs" / "tiny.yaml", ["gpt.steps=7"]).model_dump(mode="json")
    assert printed == expected
    assert printed["gpt"]["steps"] == 7 and "max_failures" in printed["gpt"]  # a default the YAML never names


def test_console_scripts_run_the_jobs():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"varray-train", "varray-generate", "varray-evaluate", "varray-make-shards"} <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
    script = Path(sys.executable).parent / "varray-train"
    if not script.exists():
        pytest.fail(f"{script} is missing: reinstall the project (./setup.sh)")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: train_var" in result.stdout
