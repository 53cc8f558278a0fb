"""Checkpoints through Ray Train: every rank saves its DeepSpeed (ZeRO) shard into a local temp
folder and reports it; Ray Train merges the folders into one checkpoint in the run's storage.

Layout of one checkpoint (`<storage>/<run>/step_00000500/`):
  deepspeed/latest                                        tag file (rank 0)
  deepspeed/state/mp_rank_00_model_states.pt              module (+ optimizer at ZeRO 0), rank 0
  deepspeed/state/zero_pp_rank_<r>_mp_rank_00_optim_states.pt   optimizer shard of rank r (ZeRO >= 1)
  deepspeed/state/zero_pp_rank_<r>_mp_rank_00_model_states.pt   parameter shard of rank r (ZeRO 3)
  train_state.json                                        step, epoch, samples seen, resumes (rank 0)
  metrics.jsonl                                           every report so far (rank 0)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import ray.train

from pipeline.train.metrics import from_jsonl, to_jsonl

DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
STATE_FILE = "train_state.json"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    resumed_from: list[int] = field(default_factory=list)  # the step of every resume, in order


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def report_metrics_and_save_checkpoint(engine: Any, state: TrainState, metrics: dict[str, Any],
                                       history: list[dict], rank: int) -> None:
    """Collective: every rank writes its shard, then reports it with the metrics."""
    with tempfile.TemporaryDirectory(prefix="varray-ckpt-") as folder:
        engine.save_checkpoint(os.path.join(folder, DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
        if rank == 0:
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(asdict(state), f)
            with open(os.path.join(folder, METRICS_FILE), "w") as f:
                f.write(to_jsonl(history))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=checkpoint_name(state.step))


def load_checkpoint(engine: Any) -> tuple[TrainState, list[dict]] | None:
    """Restore the engine (module, optimizer shard, lr schedule) from Ray Train's latest checkpoint.

    None when the run starts fresh. Every rank downloads the merged checkpoint and loads its shard.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        load_path, _ = engine.load_checkpoint(os.path.join(folder, DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"checkpoint {checkpoint.path}: DeepSpeed found no state to load")
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = TrainState(**json.load(f))
        with open(os.path.join(folder, METRICS_FILE)) as f:
            history = from_jsonl(f.read())
    return state, history
