"""A Ray cluster of one test alone, for `ray job submit`: `ray start --head` on loopback, stopped afterwards
(it and only it).

The head gets its own --temp-dir and its own ports (outside the kernel's ephemeral range, so no busy
client takes one between choosing and binding it; a head that still fails to start is retried once,
then the test fails with Ray's own logs), and is started with `ray start --block` in a new
session, so stopping it never touches another cluster of this user (`ray stop` would stop them
all): the test ends the block process (which ends what it started), then kills whatever is left in
its process group or names its temp dir on the command line.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from local_servers import wait_for_port

RAY = str(Path(sys.executable).with_name("ray"))
# As with an activated venv: the job's `python` entrypoint is this interpreter.
CLUSTER_ENV = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu",
               "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
               "RAY_DEDUP_LOGS": "0"}


def _ephemeral_range() -> range:
    """The kernel's range for outgoing connections' local ports: a port chosen inside it can be taken
    by any busy client (the session's own Ray cluster) between choosing it and Ray binding it."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_ports(count: int) -> tuple[list[int], int]:
    """`count` free ports and the start of a free block of 100 worker ports, all in 20000-29999: outside
    the ephemeral range and Ray's default worker ports (10002-19999)."""
    ephemeral = _ephemeral_range()
    candidates = [port for port in range(20000, 30000) if port not in ephemeral]
    random.shuffle(candidates)
    ports = []
    for port in candidates:
        if _is_free(port):
            ports.append(port)
        if len(ports) == count:
            break
    blocks = [base for base in range(20000, 29900, 100)
              if not any(base <= port < base + 100 for port in ports) and base + 99 not in ephemeral]
    return ports, random.choice(blocks)


def _stop_cluster(head: subprocess.Popen, temp_dir: str) -> None:
    """End only this test's cluster: the `ray start --block` process, its process group, and any process
    whose command line names this cluster's temp dir (workers Ray started outside the group)."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:  # its graceful stop outlasts 20 s here; what it leaves is killed below either way
            head.wait(timeout=5)
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


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(none)"


def _head_logs(temp_dir: str) -> str:
    """What `ray start` printed and the dashboard's own logs: why the job server is not there."""
    logs = Path(temp_dir, "session_latest", "logs")
    return "\n".join(f"--- {path.name}\n{_tail(path)}" for path in
                     [Path(temp_dir, "ray_start.log"), logs / "dashboard.log", logs / "dashboard.err"])


def _start_head(temp_dir: str) -> tuple[subprocess.Popen, int | None]:
    """`ray start --head --block` on loopback; returns the process and its dashboard port, or None for the
    port when the head exited or the dashboard did not listen within 180 s."""
    (gcs, dashboard, client, node_manager, object_manager, agent_listen, agent_grpc, runtime_env, metrics), \
        worker_base = _cluster_ports(9)
    env = {**os.environ, **CLUSTER_ENV}
    env.pop("RAY_ADDRESS", None)
    with open(Path(temp_dir, "ray_start.log"), "ab") as log:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=4",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--port={gcs}",
             f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
             f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
             f"--dashboard-agent-listen-port={agent_listen}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
             f"--min-worker-port={worker_base}", f"--max-worker-port={worker_base + 99}",
             f"--temp-dir={temp_dir}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and head.poll() is None:
        try:
            wait_for_port(dashboard, timeout=1)
            return head, dashboard
        except TimeoutError:
            continue
    return head, None


def ray_head_address() -> Iterator[str]:
    """A one-node cluster of one test alone (the fixture `ray_head` of tests/chain); yields the dashboard
    (job submission) address.

    A head that exits or whose dashboard never listens is stopped and started once more with new ports;
    a second failure fails the test with Ray's own logs."""
    failures = []
    for _ in range(2):
        temp_dir = tempfile.mkdtemp(prefix="rayd2_", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        head, dashboard = _start_head(temp_dir)
        try:
            if dashboard is not None:
                yield f"http://127.0.0.1:{dashboard}"
                return
            failures.append(f"head exit code {head.poll()}\n{_head_logs(temp_dir)}")
        finally:
            _stop_cluster(head, temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)
    pytest.fail("the Ray head's dashboard never listened, twice:\n" + "\n\n".join(failures))
