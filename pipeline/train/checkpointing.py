"""Checkpoints through Ray Train: every rank saves its DeepSpeed (ZeRO) shard into a local temp
folder and reports it; Ray Train merges the folders into one checkpoint in the run's storage.

Layout of one checkpoint (`<storage>/<run>/step_00000500/`):
  deepspeed/latest                                        tag file (rank 0)
  deepspeed/state/mp_rank_00_model_states.pt              module (+ optimizer at ZeRO 0), rank 0
  deepspeed/state/zero_pp_rank_<r>_mp_rank_00_optim_states.pt   optimizer shard of rank r (ZeRO >= 1)
  deepspeed/state/zero_pp_rank_<r>_mp_rank_00_model_states.pt   parameter shard of rank r (ZeRO 3)
  <the stage's own>                                       e.g. the tokenizer's discriminator/ (a second
                                                          DeepSpeed engine's files) and ema/rank_<r>.pt
  train_state.json                                        step, epoch, samples seen, resumes (rank 0)
  metrics.jsonl                                           every report so far (rank 0)

Resuming never unpickles arbitrary objects: every DeepSpeed file is read with
`torch.load(weights_only=True)` (tensors, containers, numbers, and the few plain DeepSpeed types in
`SAFE_GLOBALS`), so a planted pickle is refused with one line (`CheckpointError`) instead of being
run. `check_checkpoint_folder` makes the same check without loading any tensor, for a driver that
wants to refuse a run before any worker starts.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any

import ray.train
import torch

from pipeline.core.errors import VarrayError
from pipeline.train.metrics import from_jsonl, to_jsonl

DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
STATE_FILE = "train_state.json"
METRICS_FILE = "metrics.jsonl"


class CheckpointError(VarrayError):
    """A checkpoint cannot be resumed from safely (a foreign object in a pickle, a damaged file); one line."""


def _safe_globals() -> list[Any]:
    """The plain DeepSpeed types its ZeRO checkpoints hold besides tensors (found by
    torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3, fp32 and bf16 checkpoints):
    an int enum, two loss-scaler records and a (start, numel) dataclass. None runs code on load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _global_name(value: Any) -> str:
    return f"{value.__module__}.{value.__qualname__}"


def safe_torch_load(path: str, map_location: Any = None) -> Any:
    """torch.load(weights_only=True) with DeepSpeed's few plain types allowed; CheckpointError otherwise."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = " ".join(str(exc).split("Check the documentation")[0].split())
        raise CheckpointError(f"{path}: refused to load: not plain weights ({reason[:300]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: damaged checkpoint file ({text[:300]})") from None


def check_checkpoint_folder(folder: str) -> None:
    """Refuse (CheckpointError) a checkpoint folder whose DeepSpeed files hold anything but weights and
    the allowed types; reads only each file's pickle, no tensor."""
    allowed = {_global_name(value) for value in _safe_globals()}
    for root, _, names in sorted(os.walk(folder)):  # the model engine's files and the stage's own
        for name in sorted(names):
            if not name.endswith(".pt"):
                continue
            path = os.path.join(root, name)
            try:
                found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception as exc:  # not a zip checkpoint, or a damaged one
                text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise CheckpointError(f"{path}: damaged checkpoint file ({text[:300]})") from None
            unsafe = sorted(set(found) - allowed)
            if unsafe:
                raise CheckpointError(f"{path}: refused to load: it names {', '.join(unsafe[:5])}, which a "
                                      "varray checkpoint never holds")


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    resumed_from: list[int] = field(default_factory=list)  # the step of every resume, in order


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint_folder(engine: Any, folder: str, state: TrainState, history: list[dict], rank: int,
                           stage: Any = None) -> None:
    """Collective: every rank writes its shard of the engine (and of the stage's own state) into `folder`."""
    engine.save_checkpoint(os.path.join(folder, DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    if stage is not None:
        stage.save_auxiliary(folder, rank)
    if rank == 0:
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump(asdict(state), f)
        with open(os.path.join(folder, METRICS_FILE), "w") as f:
            f.write(to_jsonl(history))


def report_metrics_and_save_checkpoint(engine: Any, state: TrainState, metrics: dict[str, Any],
                                       history: list[dict], rank: int, stage: Any = None) -> None:
    """Collective: every rank writes its shard, then reports it with the metrics."""
    with tempfile.TemporaryDirectory(prefix="varray-ckpt-") as folder:
        save_checkpoint_folder(engine, folder, state, history, rank, stage)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=checkpoint_name(state.step))


def load_checkpoint(engine: Any, stage: Any = None, rank: int = 0) -> tuple[TrainState, list[dict]] | None:
    """Restore the engine (module, optimizer shard, lr schedule) from Ray Train's latest checkpoint.

    None when the run starts fresh. Every rank downloads the merged checkpoint and loads its shard.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return load_checkpoint_folder(engine, folder, str(checkpoint.path), stage=stage, rank=rank)


def load_checkpoint_folder(engine: Any, folder: str, where: str | None = None, stage: Any = None,
                           rank: int = 0) -> tuple[TrainState, list[dict]]:
    """Load one checkpoint folder (layout above) into `engine` (and the stage's own state), every file
    weights-only or JSON."""
    where = where or folder
    check_checkpoint_folder(folder)
    # DeepSpeed reads every file through its checkpoint engine's load(): ours is weights-only.
    checkpoint_engine = engine.checkpoint_engine
    checkpoint_engine.load = safe_torch_load
    load_path, _ = engine.load_checkpoint(os.path.join(folder, DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"checkpoint {where}: DeepSpeed found no state to load")
    if stage is not None:
        stage.load_auxiliary(folder, rank, where)
    state_path, metrics_path = os.path.join(folder, STATE_FILE), os.path.join(folder, METRICS_FILE)
    try:
        with open(state_path) as f:
            state = TrainState(**json.load(f))
        with open(metrics_path) as f:
            history = from_jsonl(f.read())
    except (OSError, ValueError, TypeError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {where}: {STATE_FILE} or {METRICS_FILE} is missing or damaged "
                              f"({text[:200]})") from None
    return state, history
