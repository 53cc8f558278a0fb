"""Joining Ray: the cluster of `ray job submit` / RAY_ADDRESS, or a local Ray started in-process.

Every job connects here, once, after its config is loaded (so every location in it is already
absolute) and before any task, worker or actor starts.

No orphans: Ray ties the GCS and the raylet to the driver that started them (fate sharing), but the
raylet's children (the dashboard agent, the runtime-env agent, idle workers) outlive a driver killed
with SIGKILL, and ignore SIGTERM. So a local start also starts a reaper: a small process in its own
session that waits for the driver to exit (however it ends) and then ends every process of that Ray
session still alive: those whose command line names the session folder or that hold a file open in
it (their logs), and their children. SIGTERM first, SIGKILL after `REAP_GRACE_S`.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from pipeline.core.configuration import ConfigError

logger = logging.getLogger(__name__)


def connect_ray(cpus_needed: float = 1.0, relative_locations: Sequence[str] = (),
                local_num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray in-process.

    A local start gets `local_num_cpus` logical CPUs, by default at least `cpus_needed` + 2: on a
    2-core laptop, two 1-CPU Train workers plus a reading task would otherwise wait for each other
    forever (environment.md).

    `relative_locations` are the config's locations that were given relative ("field=value", from
    `StrictModel.relative_locations`). They were made absolute against the driver's working
    directory, which only the driver's node sees: on a multi-node cluster they are refused.
    """
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            context = ray.init(num_cpus=local_num_cpus or max(os.cpu_count() or 1, math.ceil(cpus_needed) + 2))
            start_reaper(context.address_info["session_dir"])
    if not relative_locations:
        return
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes > 1:
        raise ConfigError(f"config error: {relative_locations[0]}: a relative path means the driver's folder "
                          f"{os.getcwd()}, which the other nodes of this {nodes}-node cluster cannot see; give "
                          "s3://bucket/prefix or an absolute path on storage that every node shares")
    if "runtime_resources" in os.getcwd():  # `ray job submit --working-dir`: Ray's copy of the folder
        logger.warning("%s: relative paths resolve in this job's copy of the working directory (%s), which Ray "
                       "may delete when the job ends; give an absolute path or s3:// to keep the outputs",
                       relative_locations[0], os.getcwd())


REAP_GRACE_S = 1.0


def resolve_gpus(value: str | float | bool, per_unit: float = 1.0) -> float:
    """A config's GPU field ("auto", a count, or a bool) as a number: "auto" and True mean `per_unit`
    when the connected cluster has GPUs (0 otherwise)."""
    import ray

    if value == "auto":
        return per_unit if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    if isinstance(value, bool):
        return per_unit if value else 0.0
    return float(value)


def start_reaper(session_dir: str) -> subprocess.Popen:
    """Start the reaper of the local Ray session this process started (see the module doc); `session_dir`
    is what `ray.init` reports in its context's address_info."""
    code = "import sys; from pipeline.core.ray_runtime import reap_after; reap_after(int(sys.argv[1]), sys.argv[2])"
    return subprocess.Popen([sys.executable, "-c", code, str(os.getpid()), session_dir], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            close_fds=True)


def session_processes(session_dir: str) -> list:
    """The live processes of a Ray session: the session folder in the command line or an open file in it,
    plus their descendants (psutil.Process objects; zombies left out)."""
    import psutil

    prefix = os.path.realpath(session_dir).rstrip("/") + "/"
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            hit = any(prefix in part or part == prefix[:-1] for part in process.cmdline())
            if not hit:
                fd_dir = f"/proc/{process.pid}/fd"
                for fd in os.listdir(fd_dir):
                    try:
                        if os.readlink(os.path.join(fd_dir, fd)).startswith(prefix):
                            hit = True
                            break
                    except OSError:
                        continue
            if hit:
                found[process.pid] = process
                for child in process.children(recursive=True):
                    found.setdefault(child.pid, child)
        except (psutil.Error, OSError):
            continue
    return [process for pid, process in found.items() if pid != os.getpid()]


def _wait_for_exit(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):  # gone already, or no pidfd: poll
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            time.sleep(0.2)
    import select

    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def reap_after(driver_pid: int, session_dir: str) -> None:
    """The reaper: wait for `driver_pid` to exit, then end what is left of the Ray session in `session_dir`."""
    import psutil

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the driver's terminal is the driver's
    _wait_for_exit(driver_pid)
    time.sleep(0.2)  # a driver that shut Ray down cleanly has already ended it; only stragglers are left
    left = session_processes(session_dir)
    for process in left:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=REAP_GRACE_S)
    for process in alive + [p for p in session_processes(session_dir) if p not in alive]:
        try:
            process.kill()
        except psutil.Error:
            pass


__all__ = ["connect_ray", "reap_after", "session_processes", "start_reaper"]
