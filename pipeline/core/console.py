"""A job's console: its own lines only, one per logged interval (rank 0), each step's header and summary.

Ray's and the dependencies' chatter is turned off where it starts, through their own logging and
warning settings (nothing filters the output afterwards): Ray Data's progress bars and execution
banners, Ray Train's per-report INFO records, and the deprecation warnings of torch and DeepSpeed in
every Ray worker. The full logs stay in Ray's log folder (`/tmp/ray/session_latest/logs`).
"""

from __future__ import annotations

import logging
import os
import warnings

# Inherited by the local Ray's processes (started by this driver) and given to Ray Train's workers:
# what the workers print is forwarded to this console.
QUIET_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
}
# Ray Train's own records at or above this level reach the console (its log files keep every level).
TRAIN_LOG_LEVEL = "WARNING"


def quiet_console() -> None:
    """Driver side, before Ray starts. A variable the user set already is left as it is."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


class _ConsoleFilter(logging.Filter):
    """On a worker's console: warnings and errors of everyone, INFO records of this project only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".")[0] in OWN_PACKAGES


OWN_PACKAGES = ("pipeline", "var_model", "jobs")


def quiet_worker() -> None:
    """Inside a Ray Train worker, on every rank. Ray Train logs each report at INFO on each rank,
    through a logger named after its file (so RunConfig's level misses it, Ray 2.60): the console
    handlers keep only warnings and this project's own records. The log files keep everything."""
    for handler in logging.getLogger().handlers:
        if type(handler) is not logging.FileHandler and isinstance(handler, logging.StreamHandler):
            if not any(isinstance(f, _ConsoleFilter) for f in handler.filters):
                handler.addFilter(_ConsoleFilter())


def worker_env() -> dict[str, str]:
    """The console settings for a Ray Train worker's runtime_env (the user's own values win)."""
    return {name: os.environ.get(name, value) for name, value in QUIET_ENV.items()}


__all__ = ["QUIET_ENV", "TRAIN_LOG_LEVEL", "quiet_console", "quiet_worker", "worker_env"]
