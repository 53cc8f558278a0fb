"""The reaper of a local Ray session.

No orphans: Ray ties the GCS and the raylet to the driver that started them (fate sharing), but the
raylet's children (the dashboard agent, the runtime-env agent, idle workers) outlive a driver killed
with SIGKILL, and ignore SIGTERM. So a local start also starts a reaper: a small process in its own
session that waits for the driver to exit (however it ends) and then ends every process of that Ray
session still alive: those whose command line names the session folder or that hold a file open in
it (their logs), and their children. SIGTERM first, SIGKILL after `REAP_GRACE_S`.

Kept apart from the rest of pipeline.core so that the reaper process imports only the standard
library and psutil: it starts with every local Ray, and must not pay for torch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

REAP_GRACE_S = 1.0


def start_reaper(session_dir: str) -> subprocess.Popen:
    """Start the reaper of the local Ray session this process started (see the module doc); `session_dir`
    is what `ray.init` reports in its context's address_info."""
    code = "import sys; from pipeline.core.reaper import reap_after; reap_after(int(sys.argv[1]), sys.argv[2])"
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


__all__ = ["reap_after", "session_processes", "start_reaper"]
