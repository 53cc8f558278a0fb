"""Fault tolerance and resume on S3 storage (moto): a SIGKILLed Train worker is replaced and
training continues from the last checkpoint; the same run started again resumes where it stopped."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from train_helpers import TINY_VAR, read_metrics

from pipeline.core.exports import load_var, read_export_info
from pipeline.core.storage import fsspec_filesystem, join_uri
from pipeline.train.config import GPTStageConfig
from pipeline.train.gpt_stage import run_gpt_stage

pytestmark = [pytest.mark.ray, pytest.mark.s3]

STEPS = 30


def _checkpoints(run_uri: str) -> list[str]:
    fs, path = fsspec_filesystem(run_uri)
    try:
        return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, refresh=True)
                      if os.path.basename(p.rstrip("/")).startswith("step_"))
    except FileNotFoundError:
        return []


def _kill_after_second_checkpoint(run_uri: str, pid_file: str, killed: dict, deadline: float) -> None:
    """SIGKILL rank 1 once two checkpoints exist: the first is then surely registered by Ray Train."""
    while time.time() < deadline:
        if len(_checkpoints(run_uri)) >= 2 and os.path.exists(pid_file):
            killed["pid"] = int(open(pid_file).read())
            killed["after"] = _checkpoints(run_uri)
            os.kill(killed["pid"], signal.SIGKILL)
            return
        time.sleep(0.2)


@pytest.mark.timeout(900)
def test_killed_worker_is_replaced_and_a_rerun_resumes(ray_cluster, s3_bucket, token_cache, tiny_tokenizer, tmp_path):
    storage = join_uri(s3_bucket, "runs")
    run_uri = join_uri(storage, "gpt")
    pid_dir = tmp_path / "pids"
    config = GPTStageConfig(model=TINY_VAR, num_workers=2, zero_stage=2, global_batch_size=16, micro_batch_size=8,
                            steps=STEPS, warmup_steps=2, checkpoint_every=5, keep_checkpoints=2, log_every=5,
                            max_failures=1, base_learning_rate=1e-2)
    killed: dict = {}
    killer = threading.Thread(target=_kill_after_second_checkpoint,
                              args=(run_uri, str(pid_dir / "rank1.pid"), killed, time.time() + 600), daemon=True)
    killer.start()
    export = run_gpt_stage(config, token_cache, tiny_tokenizer, storage, "gpt", worker_pid_dir=str(pid_dir))
    killer.join(timeout=5)
    assert "pid" in killed, "training finished before the worker could be killed"
    assert int((pid_dir / "rank1.pid").read_text()) != killed["pid"]  # a new worker took rank 1

    info = read_export_info(export)
    (resumed_at,) = info["resumed_from"]
    assert 5 <= resumed_at < STEPS and resumed_at % 5 == 0
    assert info["step"] == STEPS
    steps = [m["step"] for m in read_metrics(export)]
    # The counter continued from the checkpoint: no step reported twice, none restarted from 0.
    assert steps == sorted(set(steps)) and steps[-1] == STEPS and steps[0] == 5
    assert _checkpoints(run_uri) == ["step_00000025", "step_00000030"]  # keep_checkpoints=2, on S3

    # Started again with the same name and storage and a larger budget: continues from step 30.
    longer = config.model_copy(update={"steps": STEPS + 10})
    export = run_gpt_stage(longer, token_cache, tiny_tokenizer, storage, "gpt")
    info = read_export_info(export)
    assert info["resumed_from"] == [resumed_at, STEPS] and info["step"] == STEPS + 10
    steps = [m["step"] for m in read_metrics(export)]
    assert steps[-3:] == [STEPS, STEPS + 5, STEPS + 10] and steps == sorted(set(steps))
    assert _checkpoints(run_uri) == ["step_00000035", "step_00000040"]
    assert load_var(export).config.num_layers == TINY_VAR["num_layers"]
