"""End to end: `ray start --head` on loopback, `ray job submit ... jobs/train_var.py` with configs/tiny.yaml,
all outputs left in storage, then this test's cluster (and only it) stopped.

The head gets its own --temp-dir and its own ports, and is started with `ray start --block` in a new
session, so stopping it never touches another cluster of this user (`ray stop` would stop them
all): the test ends the block process (which ends what it started), then kills whatever is left in
its process group or names its temp dir on the command line.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
from PIL import Image

from local_servers import wait_for_port
from pipeline.exports import read_export_info
from pipeline.token_cache import read_manifest

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
# As with an activated venv: the job's `python` entrypoint is this interpreter.
CLUSTER_ENV = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu",
               "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
               "RAY_DEDUP_LOGS": "0"}


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


def _stop_cluster(head: subprocess.Popen, temp_dir: str) -> None:
    """End only this test's cluster: the `ray start --block` process, its process group, and any process
    whose command line names this cluster's temp dir (workers Ray started outside the group)."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            head.kill()
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    leftovers = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in process.info["cmdline"] or []):
                leftovers.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for process in leftovers:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leftovers, timeout=10)


@pytest.fixture
def ray_head():
    """A one-node cluster of this test alone; yields the dashboard (job submission) address."""
    temp_dir = tempfile.mkdtemp(prefix="rayd2_", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dashboard, client, node_manager, object_manager, agent_listen, agent_grpc, runtime_env, metrics = \
        _free_ports(9)
    worker_base = random.randrange(30000, 39000, 100)
    env = {**os.environ, **CLUSTER_ENV}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=4", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--node-manager-port={node_manager}",
         f"--object-manager-port={object_manager}", f"--dashboard-agent-listen-port={agent_listen}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
         f"--metrics-export-port={metrics}", f"--min-worker-port={worker_base}",
         f"--max-worker-port={worker_base + 99}", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(dashboard, timeout=90)
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        _stop_cluster(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_job_submit_runs_the_whole_chain(ray_head, tmp_path, fashion_mnist_dir):
    storage, shards = tmp_path / "runs", tmp_path / "shards" / "train"
    env = {**os.environ, **CLUSTER_ENV}
    env.pop("RAY_ADDRESS", None)
    # The shards do not exist yet: the job writes them (data.create) before training.
    submit = [RAY, "job", "submit", "--address", ray_head, "--working-dir", ".", "--",
              "python", "jobs/train_var.py", "--config", "configs/tiny.yaml", "--storage", str(storage),
              "--run-name", "e2e", "--set", f"data.train.shards_uri={shards}",
              "--set", f"data.create.input={fashion_mnist_dir}"]
    result = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in log, log[-4000:]

    run = storage / "e2e"
    summary = json.loads((run / "chain.json").read_text())
    assert {name: step["status"] for name, step in summary["steps"].items()} == {
        "shards": "ran", "tokenizer": "ran", "token_cache": "ran", "gpt": "ran", "samples": "ran"}
    assert (shards / "index.json").exists()
    tokenizer = read_export_info(str(run / "tokenizer" / "export"))
    var = read_export_info(str(run / "gpt" / "export"))
    assert tokenizer["format"] == "varray.tokenizer/1" and var["format"] == "varray.var/1"
    assert var["tokenizer_checksum"] == tokenizer["checksum"]
    manifest = read_manifest(str(run / "token_cache"))
    assert manifest["tokenizer_checksum"] == tokenizer["checksum"] and manifest["num_rows"] == 256
    grid = Image.open(run / "samples.png")
    # 3 classes x 2 per class of 16 px tiles with 2 px gaps.
    assert grid.size == (2 * 16 + 2, 3 * 16 + 2 * 2)

    # The same command again resumes: every step's output exists, so nothing runs twice.
    again = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    summary = json.loads((run / "chain.json").read_text())
    assert all(step["status"] == "skipped" for step in summary["steps"].values()), summary
