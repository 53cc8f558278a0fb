"""SIGKILL the generation driver mid-run, run it again: exactly the planned keys, once each, no partial objects.

The job runs as users run it (`python jobs/generate_dataset.py`, its own local Ray) in a subprocess,
writing to S3 on moto. The test kills the driver as soon as the first unit is published.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest

from pipeline.core.configuration import load_config
from pipeline.core.storage import fsspec_filesystem, pyarrow_filesystem
from pipeline.generation.config import GenerateConfig
from pipeline.generation.job import prepare

REPO = Path(__file__).resolve().parents[2]
UNITS = 24


def command(tokenizer: str, var: str, output: str) -> list[str]:
    # batch_size 1: each unit is several generate() calls, so the run lasts long enough to be cut.
    return [sys.executable, str(REPO / "jobs" / "generate_dataset.py"), "--tokenizer", tokenizer, "--var", var,
            "--output", output, "--per-class", "12", "--set", "plan.unit_size=5", "--set", "sampling.batch_size=1",
            "--set", "compute.num_cpus=0.5", "--set", "compute.local_num_cpus=2"]


def stop_leftovers(processes: list[psutil.Process], grace_s: float = 20.0) -> None:
    """Ray's own processes follow a dead driver within seconds; end any that did not, one by one."""
    deadline = time.time() + grace_s
    while time.time() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes):
        time.sleep(0.5)
    for process in processes:
        try:
            if process.is_running():
                process.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.s3
@pytest.mark.timeout(420)
def test_killed_driver_then_rerun_gives_each_planned_key_once(s3_bucket, tiny_exports, tmp_path):
    output = f"{s3_bucket}/sets/killed"
    fs, root = fsspec_filesystem(output)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}

    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command(*tiny_exports, output), env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None:
            if fs.exists(f"{root}/stats") and fs.ls(f"{root}/stats", refresh=True):
                break
            time.sleep(0.2)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
        children = psutil.Process(first.pid).children(recursive=True)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    stop_leftovers(children)
    done_at_kill = len(fs.ls(f"{root}/stats", refresh=True))
    assert 0 < done_at_kill < UNITS, f"kill landed after {done_at_kill} of {UNITS} units"

    rerun = subprocess.run(command(*tiny_exports, output), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["units"] == UNITS and 0 < summary["units_generated"] <= UNITS - done_at_kill

    # Exactly the planned files: no temp or partial objects anywhere under the output.
    names = sorted(path.split(f"{root}/", 1)[1] for path in fs.find(root))
    expected = sorted(["plan.json"] + [f"data/part-{i:06d}.parquet" for i in range(UNITS)]
                      + [f"stats/part-{i:06d}.json" for i in range(UNITS)])
    assert names == expected

    planned = prepare(load_config(GenerateConfig, None, [
        f"model.tokenizer={tiny_exports[0]}", f"model.var={tiny_exports[1]}", f"output.uri={output}",
        "plan.per_class=12", "plan.unit_size=5", "sampling.batch_size=1"])).units
    arrow_fs, data_path = pyarrow_filesystem(f"{output}/data")
    frame = pq.read_table(data_path, filesystem=arrow_fs).to_pandas()
    assert sorted(frame.key) == sorted(key for unit in planned for key in unit.keys)  # each key exactly once
    assert len(frame) == 120 and frame.key.is_unique
    expected_seeds = {key: seed for unit in planned for key, seed in zip(unit.keys, unit.seeds)}
    assert all(expected_seeds[key] == seed for key, seed in zip(frame.key, frame.seed))
    # Every published file is whole: its stats JSON names its size and digest.
    for unit in planned:
        stats = json.loads(fs.cat(f"{root}/stats/{unit.name}.json"))
        assert fs.size(f"{root}/data/{unit.name}.parquet") == stats["bytes"]
        assert pd.read_parquet(fs.open(f"{root}/data/{unit.name}.parquet")).key.tolist() == list(unit.keys)
