"""The GPT stage on a simulated two-node cluster, one Train worker per node (in a subprocess:
`ray.cluster_utils.Cluster` needs a process of its own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray]

SCRIPT = os.path.join(os.path.dirname(__file__), "two_node_run.py")


@pytest.mark.timeout(660)
def test_gpt_stage_on_two_nodes(token_cache, tiny_tokenizer, tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, token_cache, tiny_tokenizer, str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=640)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["cluster_nodes"]) == 2
    assert sorted(result["worker_nodes"]) == sorted(result["cluster_nodes"])  # one worker on each node
    assert result["step"] == 4 and len(result["losses"]) == 2
    assert os.path.exists(tmp_path / "runs" / "gpt-two-nodes" / "export" / "model.safetensors")
