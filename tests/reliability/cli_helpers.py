"""What the reliability tests share: run a job's CLI as a user does, and check its one-line failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_cli(job: str, *args: str, cwd: Path | str | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """`python jobs/<job>.py ARGS` in its own process, as a user runs it; output captured as text."""
    merged = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a local Ray by default
    merged.update(env or {})
    return subprocess.run([sys.executable, str(REPO / "jobs" / f"{job}.py"), *args], cwd=cwd or REPO, env=merged,
                          capture_output=True, text=True, timeout=timeout)


# Ray's own background actors report trouble with their environment on the job's console, e.g. Ray
# Train's placement-group cleaner prints a traceback when it finds several Ray clusters on one machine
# (this test session runs one besides each job's own). Their lines are Ray's, not the job's answer.
RAYS_OWN = ("(PlacementGroupCleaner pid=", "(TrainController pid=")


def one_line_error(result: subprocess.CompletedProcess, prog: str) -> str:
    """The job failed as an expected failure does: exit 2, no traceback, one `prog: ...` line last on stderr."""
    assert result.returncode == 2, f"rc {result.returncode}\n{result.stderr[-3000:]}"
    own = "\n".join(line for line in result.stderr.splitlines() if not line.lstrip("\x1b[0123456789m").startswith(
        RAYS_OWN))
    assert "Traceback" not in own, own[own.index("Traceback") - 300:][:3000]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: "), last
    return last
