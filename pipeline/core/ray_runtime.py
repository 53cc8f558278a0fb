"""Joining Ray: the cluster of `ray job submit` / RAY_ADDRESS, or a local Ray started in-process.

Every job connects here, once, after its config is loaded (so every location in it is already
absolute) and before any task, worker or actor starts.

A local start also starts the reaper (pipeline.core.reaper): no Ray process outlives a killed driver.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

from pipeline.core.configuration import ConfigError
from pipeline.core.reaper import start_reaper

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


def resolve_gpus(value: str | float | bool, per_unit: float = 1.0) -> float:
    """A config's GPU field ("auto", a count, or a bool) as a number: "auto" and True mean `per_unit`
    when the connected cluster has GPUs (0 otherwise)."""
    import ray

    if value == "auto":
        return per_unit if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    if isinstance(value, bool):
        return per_unit if value else 0.0
    return float(value)


__all__ = ["connect_ray", "resolve_gpus"]
