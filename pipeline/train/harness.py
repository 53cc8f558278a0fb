"""One training harness for both stages: Ray Train workers running a DeepSpeed engine.

Driver side, `run_training` builds a `TorchTrainer` (workers, storage, checkpoint rotation,
failure restarts) around `train_loop_per_worker`. Worker side: seed, build the model, wrap it in
DeepSpeed (ZeRO 0-3, bf16/fp32, clipping, accumulation), resume from Ray Train's latest checkpoint,
then loop over a fresh iterator of this worker's dataset shard per epoch until the step budget is
spent, reporting metrics every `log_every` steps and checkpoints every `checkpoint_every` steps.
Each report also goes live to TensorBoard / CSV / wandb (rank 0, pipeline.train.reporting); every
`validate_every` / `sample_every` steps come a validation pass and a sample grid (pipeline.train.validation).
At the end rank 0 exports consolidated fp32 weights plus `metrics.jsonl`.
A stage may train more than its model (TrainingStage.setup_auxiliary: e.g. the tokenizer's
discriminator engine and EMA): its hooks run around each micro-batch, its state goes into every
checkpoint beside the engine's and comes back on resume, and it chooses the exported weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.core.console import TRAIN_LOG_LEVEL, quiet_worker, worker_env
from pipeline.core.errors import VarrayError
from pipeline.core.layout import stage_export
from pipeline.core.storage import (
    absolute_uri,
    exists,
    join_uri,
    move_aside,
    pyarrow_filesystem,
    read_bytes,
    remove,
    write_bytes_atomic,
)
from pipeline.train.checkpointing import (
    METRICS_FILE,
    STATE_FILE,
    TrainState,
    load_checkpoint,
    load_checkpoint_folder,
    report_metrics_and_save_checkpoint,
)
from pipeline.train.config import RESUME_KEYWORDS
from pipeline.train.deepspeed_config import build_deepspeed_config, resolve_precision
from pipeline.train.deepspeed_ops import prepare_worker, watch_worker_start
from pipeline.train.metrics import MetricsAccumulator, progress_line, to_jsonl
from pipeline.train.optimizer import build_optimizer, build_schedule
from pipeline.train.reporting import LiveReport, check_report_to, worker_environment
from pipeline.train.stage import TrainingStage
from pipeline.train.validation import SamplePainter, periodic_work

logger = logging.getLogger(__name__)  # the worker's console shows this project's INFO lines (pipeline.core.console)

# Written by rank 0 when training stops on purpose before its export (a non-finite loss, too many
# skipped samples); the driver turns it into one line. Workers return normally: a deterministic
# failure must not be retried from the last checkpoint by Ray Train.
STOPPED_FILE = "stopped.json"


class TrainingStopped(VarrayError):
    """A stage stopped before its export; the message names the stage, the step and the likely field."""


@dataclass
class TrainingResult:
    export_uri: str
    run_uri: str
    total_steps: int


# ----------------------------------------------------------------------------------------------
# Worker side


def setup_model_and_optimizer(stage: TrainingStage, world_size: int, precision: str, total_steps: int):
    """The DeepSpeed engine around the stage's model, a client AdamW and the reference schedule."""
    import deepspeed

    config = stage.config
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = stage.build_model()
    leaves = stage.zero3_leaf_modules()
    if config.zero_stage == 3 and leaves:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, leaves)
    optimizer = build_optimizer(model, config, stage.no_decay_keys)
    schedule = build_schedule(optimizer, config, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule,
        config=build_deepspeed_config(config, world_size, precision))
    return engine


def _all_ranks(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on every rank: all ranks stop an epoch together (no hung collective)."""
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _rank0_decides(reason: str | None) -> str | None:
    """Rank 0's `reason` on every rank, so all of them stop (or go on) together."""
    box = [reason]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _not_finite_reason(stage: TrainingStage, step: int, loss: float, grad_norm: float | None,
                       learning_rate: float) -> str:
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    hint = f"{stage.name}.base_learning_rate (lr {learning_rate:.3g} at this step)"
    if not stage.config.grad_clip:
        hint += " or grad_clip (0: no clipping)"
    return (f"{stage.name} stage: {what} is not finite at step {step}; likely field: {hint}; nothing was "
            "exported and the last checkpoint is kept")


def _load_named_checkpoint(engine: Any, uri: str, stage: TrainingStage, rank: int) -> tuple[TrainState, list[dict]]:
    filesystem, path = pyarrow_filesystem(uri)
    with ray.train.Checkpoint(path, filesystem=filesystem).as_directory() as folder:
        return load_checkpoint_folder(engine, folder, uri, stage=stage, rank=rank)


def _record_pid(folder: str | None, rank: int) -> None:
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))


def export_weights(stage: TrainingStage, engine: Any, export_uri: str, state: TrainState,
                   history: list[dict], rank: int, extra: dict[str, Any]) -> None:
    """Collective gather of the full fp32 weights (the stage's choice: e.g. its EMA); rank 0 writes
    metrics.jsonl then the export."""
    state_dict = stage.export_state_dict(engine)
    if rank != 0:
        return
    model = stage.build_model()
    model.load_state_dict(state_dict, strict=True)
    write_bytes_atomic(join_uri(export_uri, METRICS_FILE), to_jsonl(history).encode())
    stage.export(model.eval(), export_uri, {**extra, **asdict(state)})


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    stage: TrainingStage = loop_config["stage"]
    total_steps: int = loop_config["total_steps"]
    config = stage.config
    quiet_worker()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    prepare_worker(rank)  # DeepSpeed's CPU comm op ready (no stale build lock), this rank marked started
    _record_pid(loop_config.get("worker_pid_dir"), rank)
    device = ray.train.torch.get_device()
    precision = resolve_precision(config, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    # Where the workers run (recorded in the export): ZeRO shards cross nodes when these differ.
    worker_nodes: list[str] = [""] * world_size
    dist.all_gather_object(worker_nodes, ray.get_runtime_context().get_node_id())

    stage.setup_worker(device)
    engine = setup_model_and_optimizer(stage, world_size, precision, total_steps)
    stage.setup_engine(engine)
    stage.setup_auxiliary(engine, world_size, precision, total_steps)
    restored = load_checkpoint(engine, stage=stage, rank=rank)
    if restored is None and config.resume not in RESUME_KEYWORDS:  # a named checkpoint starts this run
        restored = _load_named_checkpoint(engine, config.resume, stage, rank)
    state, history = restored if restored is not None else (TrainState(), [])
    last_checkpoint_step = state.step if restored is not None else -1
    if restored is not None:
        state.resumed_from.append(state.step)
        if rank == 0:
            logger.info("[%s] resumed from step %d", stage.name, state.step)
    # Different dropout / label-dropout draws per rank; fresh ones after a resume.
    torch.manual_seed(config.seed + 7919 * rank + state.step)

    shard = ray.train.get_dataset_shard("train")
    # Live reports (rank 0), the validation set and the sample grids (pipeline.train.reporting, .validation).
    validation = ray.train.get_dataset_shard("validation") if loop_config.get("validation") else None
    painter = SamplePainter(stage, device) if getattr(config, "sample_every", 0) else None
    live = LiveReport(loop_config["run_uri"], stage.name, config.report_to, history, state.step,
                      config.model_dump(mode="json")) if rank == 0 else None
    accumulator = MetricsAccumulator(device)
    pending: dict[str, float] = {}
    window_loss = torch.zeros((), device=device)  # this accumulation window's losses: non-finite if any is
    stop_reason: str | None = None
    attempt_started, first_step = time.perf_counter(), state.step
    while state.step < total_steps:
        batches = iter(shard.iter_torch_batches(batch_size=config.micro_batch_size, drop_last=True,
                                                device=device, prefetch_batches=2, **stage.batch_options()))
        micro_batches_this_epoch = 0
        while state.step < total_steps:
            waited = time.perf_counter()
            batch = next(batches, None)
            waited = time.perf_counter() - waited
            if not _all_ranks(batch is not None, device):
                break
            accumulator.data_wait_seconds += waited
            micro_batches_this_epoch += 1
            engine.train()
            stage.before_micro_batch(state.step)
            loss, metrics = stage.compute_loss(engine, batch, dtype)
            engine.backward(loss)
            steps_before = engine.global_steps
            learning_rate = engine.get_lr()[0]  # the lr this step applies (the schedule moves in step())
            engine.step()
            metrics.update(stage.after_micro_batch())
            accumulator.add({"loss": loss.detach(), **metrics}, samples=config.micro_batch_size)
            window_loss += loss.detach().float()  # no host sync per micro-batch
            if engine.global_steps == steps_before:
                continue  # inside a gradient-accumulation window
            state.step += 1
            # One collective per optimizer step: stop on a non-finite loss or gradient before any
            # checkpoint or export can hold NaN weights.
            grad_norm = engine.get_global_grad_norm()
            grad_norm = None if grad_norm is None else float(grad_norm)
            window = float(window_loss)
            finite = math.isfinite(window) and (grad_norm is None or math.isfinite(grad_norm))
            if not _all_ranks(finite, device):
                stop_reason = _not_finite_reason(stage, state.step, window, grad_norm, learning_rate)
                break
            window_loss.zero_()
            state.samples_seen += config.global_batch_size
            pending.update(stage.after_optimizer_step(engine, state.step))
            validated = periodic_work(stage, engine, state.step, total_steps, validation=validation, painter=painter,
                                      live=live, accumulator=accumulator, dtype=dtype, device=device, rank=rank)
            pending.update(validated or {})
            checkpoint_due = state.step % config.checkpoint_every == 0 or state.step == total_steps
            if not (checkpoint_due or validated is not None or state.step % config.log_every == 0):
                continue
            stop_reason = _rank0_decides(stage.stop_reason(state.step) if rank == 0 else None)
            if stop_reason is not None:
                break
            report = {**accumulator.reduce(), **stage.interval_metrics(), **pending,
                      "step": state.step, "epoch": state.epoch, "samples_seen": state.samples_seen,
                      "learning_rate": learning_rate,
                      # Time left at this attempt's pace so far (start-up excluded: from its first step).
                      "eta_seconds": round((time.perf_counter() - attempt_started) / max(state.step - first_step, 1)
                                           * (total_steps - state.step), 1)}
            pending = {}
            if rank == 0:
                history.append(report)
                logger.info("%s", progress_line(stage.name, report, total_steps))
                live.log(report)  # TensorBoard / CSV / wandb, flushed now
            if checkpoint_due:
                report_metrics_and_save_checkpoint(engine, state, report, history, rank, stage=stage)
                last_checkpoint_step = state.step
            else:
                ray.train.report(report)
        else:
            break  # step budget spent inside the epoch
        if stop_reason is not None:
            break
        if micro_batches_this_epoch == 0:
            raise RuntimeError(f"[{stage.name}] a dataset shard holds fewer than micro_batch_size="
                               f"{config.micro_batch_size} samples: nothing to train on")
        state.epoch += 1

    if stop_reason is None:  # the last word before the export, e.g. samples skipped in the final steps
        stop_reason = _rank0_decides(stage.stop_reason(state.step) if rank == 0 else None)
    if live is not None:
        live.close()
    if stop_reason is not None:
        if rank == 0:
            logger.info("[%s] stopped: %s", stage.name, stop_reason)
            write_bytes_atomic(join_uri(loop_config["run_uri"], STOPPED_FILE),
                               json.dumps({"step": state.step, "reason": stop_reason}).encode())
        return
    if last_checkpoint_step != state.step:  # e.g. resumed at the end with a larger budget reached
        report_metrics_and_save_checkpoint(engine, state, {"step": state.step}, history, rank, stage=stage)
    export_weights(stage, engine, loop_config["export_uri"], state, history, rank, {
        "run_name": loop_config["run_name"], "stage": stage.name, "zero_stage": config.zero_stage,
        "num_workers": world_size, "precision": precision, "global_batch_size": config.global_batch_size,
        "total_steps": total_steps, "worker_nodes": worker_nodes, **stage.export_extra()})


# ----------------------------------------------------------------------------------------------
# Driver side


def _resolve_use_gpu(use_gpu: str | bool) -> bool:
    if use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(use_gpu)


def run_training(stage: TrainingStage, dataset: ray.data.Dataset, storage_uri: str, run_name: str, *,
                 num_samples: int | None = None, worker_pid_dir: str | None = None,
                 validation: ray.data.Dataset | None = None) -> TrainingResult:
    """Train `stage` on `dataset` under Ray Train; returns where the export landed.

    The run lives at `<storage_uri>/<run_name>/` (Ray Train checkpoints `step_XXXXXXXX/` and the
    final `export/`). Started again with the same storage and name, it resumes from the newest
    checkpoint. `num_samples` turns `epochs` into steps (counted when not given).
    `worker_pid_dir`: each worker writes `rank<r>.pid` there (operations and fault-injection tests).
    `validation`: the stage's validation set (same columns), passed over every `validate_every` steps.
    """
    check_report_to(stage.config.report_to)  # e.g. wandb asked for but not installed: one line, no workers
    if not ray.is_initialized():
        ray.init()
    config = stage.config
    storage_uri = absolute_uri(storage_uri)  # the workers run in Ray's folder, not the driver's
    if config.epochs is not None and num_samples is None:
        num_samples = dataset.count()
    total_steps = config.total_steps(num_samples)
    use_gpu = _resolve_use_gpu(config.use_gpu)
    filesystem, storage_path = pyarrow_filesystem(storage_uri)
    run_uri = join_uri(storage_uri, run_name)
    export_uri = stage_export(run_uri)
    if config.resume == "none":  # start at step 0: Ray Train would resume from the run's folder
        moved = move_aside(run_uri)
        if moved:
            logger.info("%s stage: resume none, the earlier run moved to %s", stage.name, moved)
    elif config.resume != "latest" and not exists(join_uri(config.resume, STATE_FILE)):
        raise TrainingStopped(f"{stage.name}.resume: {config.resume} is not a checkpoint (no {STATE_FILE})")

    resources: dict[str, float] = {"CPU": config.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    env_vars = {**worker_env(), **({} if use_gpu else {"DS_ACCELERATOR": "cpu"})}
    env_vars.update(worker_environment(config.report_to))  # WANDB_MODE=offline etc. reach the workers
    watch_worker_start(stage.name, config.num_workers, env_vars)  # op cache + "what the start waits for"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"stage": stage, "total_steps": total_steps, "export_uri": export_uri,
                           "run_uri": run_uri, "run_name": run_name, "worker_pid_dir": worker_pid_dir,
                           "validation": validation is not None},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=config.placement_strategy),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=FailureConfig(max_failures=config.max_failures),
            logging_config=LoggingConfig(log_level=TRAIN_LOG_LEVEL),
            worker_runtime_env={"env_vars": env_vars}),
        datasets={"train": dataset.select_columns(list(stage.columns)),
                  **({} if validation is None else {"validation": validation.select_columns(list(stage.columns))})},
    )
    stopped = join_uri(run_uri, STOPPED_FILE)
    remove(stopped)  # a stop of an earlier attempt: this one decides afresh
    trainer.fit()
    if exists(stopped) and not exists(join_uri(export_uri, "config.json")):
        raise TrainingStopped(json.loads(read_bytes(stopped))["reason"])
    return TrainingResult(export_uri=export_uri, run_uri=run_uri, total_steps=total_steps)
