"""Run the GPT stage on a simulated two-node Ray cluster (ray.cluster_utils.Cluster).

A script, not a test: one Ray instance per process, and the pytest process already holds the
session cluster. Usage: two_node_run.py TOKEN_CACHE TOKENIZER STORAGE; prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_helpers import TINY_VAR, read_metrics  # noqa: E402

from pipeline.core.exports import read_export_info  # noqa: E402
from pipeline.train.config import GPTStageConfig  # noqa: E402
from pipeline.train.gpt_stage import run_gpt_stage  # noqa: E402


def main(token_cache: str, tokenizer: str, storage: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}})
    try:
        nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
        # STRICT_SPREAD: one worker per node, so ZeRO's collectives cross the (simulated) node boundary.
        config = GPTStageConfig(model=TINY_VAR, num_workers=2, zero_stage=2, placement_strategy="STRICT_SPREAD",
                                global_batch_size=16, micro_batch_size=8, steps=4, warmup_steps=1,
                                checkpoint_every=4, log_every=2, max_failures=0, base_learning_rate=1e-2)
        export = run_gpt_stage(config, token_cache, tokenizer, storage, "gpt-two-nodes")
        info = read_export_info(export)
        print(json.dumps({"cluster_nodes": nodes, "worker_nodes": info["worker_nodes"], "step": info["step"],
                          "losses": [m["loss"] for m in read_metrics(export)]}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
