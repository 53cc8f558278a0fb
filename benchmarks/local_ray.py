"""Imported first by the benchmarks that train on a local Ray: its settings, before Ray or DeepSpeed load
(shared/reference/environment.md: token auth off, no usage stats, quick health checks, CPU DeepSpeed)."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
