"""DeepSpeed's compiled CPU communication op (`deepspeed_shm_comm`): where it is built, and no silent hang.

DeepSpeed compiles the op at its first start with torch.utils.cpp_extension, into the torch
extension cache, guarded by a lock file (torch's FileBaton: a plain file `lock` in the op's build
folder, created with O_EXCL and held open by the builder until the build ends, then removed). A
builder killed midway leaves the lock, and every later start waits for it forever, silently.

- The cache is the project environment's own: `<sys.prefix>/torch_extensions` (an explicit
  TORCH_EXTENSIONS_DIR is kept), so two environments never rebuild over each other's flags.
  `build()` (the last step of setup.sh) pays the build once.
- A lock with no live builder is removed with a warning naming the file. "No live builder": no
  process of this machine holds the lock file open (read from /proc/<pid>/fd; the builder keeps
  the descriptor FileBaton opened until it removes the file) and nothing in the build folder changed
  for `STALE_AFTER_S` seconds (a builder on another machine sharing the folder keeps writing
  objects). A process that waits on a lock whose builder dies meanwhile is covered too: a watcher
  removes the lock, the wait ends, the import of the unfinished op fails, and the load is retried.
- `watch_worker_start` (driver) and `prepare_worker` (each Ray Train worker, before DeepSpeed
  starts) log what a Train start waits for when its workers have not all started training after
  VARRAY_TRAIN_START_WARN_S seconds (default 120): ready ranks, free resources, placement groups,
  the op's lock and its holder.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, MutableMapping
from typing import Any

logger = logging.getLogger(__name__)

OP_NAME = "deepspeed_shm_comm"
STALE_AFTER_S = float(os.environ.get("VARRAY_OP_LOCK_STALE_S", "20"))
START_WARN_ENV = "VARRAY_TRAIN_START_WARN_S"
_START_KEY_ENV = "VARRAY_TRAIN_START_KEY"
_KV_NAMESPACE = "varray_train_start"


def extensions_dir() -> str:
    """The torch extension cache of this environment (TORCH_EXTENSIONS_DIR if set, else <prefix>/torch_extensions)."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(sys.prefix, "torch_extensions")


def use_project_cache(env: MutableMapping[str, str] | None = None) -> str:
    """Point torch's extension cache at this environment's, in this process and in `env` (a worker env)."""
    folder = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = folder
    if env is not None:
        env.setdefault("TORCH_EXTENSIONS_DIR", folder)
    return folder


def lock_path(op_name: str = OP_NAME) -> str:
    return os.path.join(extensions_dir(), op_name, "lock")


def lock_holders(path: str) -> list[int]:
    """PIDs of the processes of this machine that hold `path` open (those whose fds we may read)."""
    target = os.path.realpath(path)
    holders = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            for fd in os.listdir(fd_dir):
                try:
                    if os.readlink(os.path.join(fd_dir, fd)) == target:
                        holders.append(int(entry))
                        break
                except OSError:
                    continue
        except OSError:  # gone, or another user's
            continue
    return holders


def _last_change(folder: str) -> float:
    newest = 0.0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
            except OSError:
                continue
    return newest


def remove_stale_lock(op_name: str = OP_NAME, stale_after_s: float | None = None) -> bool:
    """Remove the op's build lock when no builder is alive (see the module doc); True when removed."""
    path = lock_path(op_name)
    if not os.path.exists(path) or lock_holders(path):
        return False
    quiet_for = time.time() - _last_change(os.path.dirname(path))
    if quiet_for < (STALE_AFTER_S if stale_after_s is None else stale_after_s):
        return False
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    logger.warning("removed the stale build lock %s of DeepSpeed's %s op: no process holds it and its folder "
                   "has not changed for %.0f s (a build was killed midway); building it again", path, op_name,
                   quiet_for)
    return True


def _shm_builder():
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return None
    import deepspeed.ops

    if not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def _watch_lock(stop: threading.Event, op_name: str) -> None:
    while not stop.wait(1.0):
        remove_stale_lock(op_name)


def build(verbose: bool = False, attempts: int = 3) -> Any:
    """Load (building once if needed) DeepSpeed's CPU communication op in this environment's cache.

    Returns the op module, or None where DeepSpeed does not use it (a GPU accelerator, no compiler).
    DeepSpeed's own later load returns this same module (its builder caches loaded ops).
    """
    use_project_cache()
    builder = _shm_builder()
    if builder is None:
        return None
    for attempt in range(attempts):
        remove_stale_lock(builder.NAME)
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_lock, args=(stop, builder.NAME), daemon=True)
        watcher.start()
        try:
            return builder.load(verbose=verbose)
        except ImportError:  # waited on a builder that died: the lock went, the op was not built
            if attempt == attempts - 1:
                raise
        finally:
            stop.set()
    return None


# ----------------------------------------------------------------------------------------------
# Train starts that wait: the driver says what for.


def _internal_kv():
    from ray.experimental import internal_kv

    return internal_kv


def prepare_worker(rank: int) -> None:
    """Worker side, before DeepSpeed starts: the op is ready (stale lock removed, built once), then
    this rank is recorded as started for the driver's watchdog."""
    build()
    key = os.environ.get(_START_KEY_ENV)
    if key:
        _internal_kv()._internal_kv_put(f"{key}/{rank}", b"1", namespace=_KV_NAMESPACE)


def _started_ranks(key: str, num_workers: int) -> list[int]:
    kv = _internal_kv()
    return [rank for rank in range(num_workers) if kv._internal_kv_exists(f"{key}/{rank}", namespace=_KV_NAMESPACE)]


def _waiting_for(stage_name: str, num_workers: int, started: list[int], waited: float) -> str:
    import ray

    parts = [f"{len(started)} of {num_workers} started"]
    try:
        free, total = ray.available_resources(), ray.cluster_resources()
        parts.append("resources free: " + ", ".join(
            f"{name} {free.get(name, 0):g}/{total[name]:g}" for name in ("CPU", "GPU", "memory") if name in total
            and name != "memory"))
        pending = [pg for pg in ray.util.placement_group_table().values() if pg.get("state") != "CREATED"
                   and pg.get("state") != "REMOVED"]
        parts.append(f"{len(pending)} placement group(s) pending" if pending else "placement groups created")
    except Exception as exc:  # the report must never stop training
        parts.append(f"resources unknown ({exc})")
    path = lock_path()
    if os.path.exists(path):
        holders = lock_holders(path)
        parts.append(f"DeepSpeed op build lock {path} held by pid {holders}" if holders
                     else f"DeepSpeed op build lock {path} with no live builder")
    else:
        parts.append("no DeepSpeed op build lock")
    return (f"{stage_name} stage: waiting {waited:.0f} s for {num_workers - len(started)} of {num_workers} workers to "
            f"start training ({'; '.join(parts)})")


_current: dict[str, threading.Event] = {}


def watch_worker_start(stage_name: str, num_workers: int, worker_env: MutableMapping[str, str],
                       warn_after_s: float | None = None, log: Callable[[str], None] | None = None) -> threading.Event:
    """Driver side, before the trainer starts: this environment's op cache for the driver and the
    workers (`worker_env` gains TORCH_EXTENSIONS_DIR and the start key), a stale lock removed, and a
    daemon thread that logs what the start waits for every `warn_after_s` seconds (default
    VARRAY_TRAIN_START_WARN_S or 120) until every worker has started. Returns the thread's stop event."""
    use_project_cache(worker_env)
    remove_stale_lock()
    for stop in _current.values():  # an earlier stage's watchdog (its run ended or failed)
        stop.set()
    _current.clear()
    key = uuid.uuid4().hex
    worker_env[_START_KEY_ENV] = key
    warn_after_s = float(os.environ.get(START_WARN_ENV, "120") if warn_after_s is None else warn_after_s)
    stop = threading.Event()
    _current[key] = stop
    say = log or logger.warning

    def watch() -> None:
        began = time.monotonic()
        while not stop.wait(warn_after_s):
            try:
                started = _started_ranks(key, num_workers)
            except Exception:  # Ray shut down: the run is over
                return
            if len(started) >= num_workers:
                return
            say(_waiting_for(stage_name, num_workers, started, time.monotonic() - began))

    threading.Thread(target=watch, name=f"{stage_name}-start-watchdog", daemon=True).start()
    return stop


__all__ = ["OP_NAME", "build", "extensions_dir", "lock_path", "lock_holders", "prepare_worker", "remove_stale_lock",
           "use_project_cache", "watch_worker_start"]
