"""One timed call: wall seconds and this process's CPU seconds, with the GPU's queue drained around it."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def measure(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu
