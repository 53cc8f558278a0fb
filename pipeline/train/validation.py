"""Work the harness does every N steps besides training: a validation pass and a sample grid.

`validation_metrics`: every rank runs its shard of the validation set through the stage's loss, the
model in eval mode under no_grad; the means over all ranks come back as `val_<metric>` (the training
metric's name with `val_` in front: val_loss, val_accuracy, val_scale_accuracy_<k> ...). A stage may
validate another module than the engine (`validation_module`, e.g. a copy holding its EMA weights)
and add figures of the whole pass (`validation_summary`, e.g. an FID). Collective: every rank calls
it at the same step.

`sample_picture`: the stage's grid of generated images from the whole fp32 weights (gathered from
every rank, whatever the ZeRO stage, so a collective too), drawn on rank 0 with a copy of the model in
eval mode; the training RNG is left as it was.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.train.metrics import MetricsAccumulator
from pipeline.train.weights import full_state_dict

VALIDATION_PREFIX = "val_"
# What the accumulator adds about the data stream; not a figure of the validation set.
_THROUGHPUT_KEYS = ("samples_per_second", "data_wait_seconds", "data_wait_fraction")


def is_due(every: int, step: int, total_steps: int) -> bool:
    """Every `every` steps and at the last step; never when `every` is 0."""
    return bool(every) and (step % every == 0 or step == total_steps)


def _every_rank_has(flag: bool, device: torch.device) -> bool:
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _validation_loss(stage: Any):
    # A stage may compute its validation loss its own way (e.g. without updating training counters).
    return getattr(stage, "validation_loss", stage.compute_loss)


def validation_metrics(stage: Any, engine: Any, shard: Any, dtype: torch.dtype, device: torch.device,
                       batch_size: int) -> dict[str, float]:
    """`val_*` means of the stage's loss and metrics over the validation shards of all ranks."""
    loss_of = _validation_loss(stage)
    accumulator = MetricsAccumulator(device)
    batches = iter(shard.iter_torch_batches(batch_size=batch_size, drop_last=False, device=device))
    module = stage.validation_module(engine) if hasattr(stage, "validation_module") else engine
    engine.eval()
    try:
        with torch.no_grad():
            while True:
                batch = next(batches, None)
                # Ranks step together (a ZeRO-3 forward gathers parameters): stop when any rank runs out.
                if not _every_rank_has(batch is not None, device):
                    break
                loss, metrics = loss_of(module, batch, dtype)
                accumulator.add({"loss": loss.detach(), **metrics}, samples=len(next(iter(batch.values()))))
    finally:
        engine.train()
    reduced = accumulator.reduce()
    if hasattr(stage, "validation_summary"):
        reduced.update(stage.validation_summary())
    return {f"{VALIDATION_PREFIX}{name}": value for name, value in reduced.items() if name not in _THROUGHPUT_KEYS}


class SamplePainter:
    """Rank 0's fp32 copy of the model, refreshed from the engine each time a grid is due."""

    def __init__(self, stage: Any, device: torch.device):
        self.stage, self.device = stage, device
        self.model: torch.nn.Module | None = None

    def picture(self, engine: Any, rank: int) -> np.ndarray | None:
        """Collective: the gathered weights; rank 0 returns the stage's grid (uint8 [H, W, C]), others None."""
        state_dict = full_state_dict(engine.module)
        if rank != 0:
            return None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # building and sampling draw no training randomness
            if self.model is None:
                self.model = self.stage.build_model().to(self.device)
            self.model.load_state_dict(state_dict, strict=True)
            self.model.eval()
            with torch.no_grad():
                return self.stage.sample_picture(self.model)


def periodic_work(stage: Any, engine: Any, step: int, total_steps: int, *, validation: Any,
                  painter: SamplePainter | None, live: Any, accumulator: MetricsAccumulator, dtype: torch.dtype,
                  device: torch.device, rank: int) -> dict[str, float] | None:
    """On every rank after an optimizer step: the validation pass and the sample grid when due.

    Returns the validation metrics when a pass ran (the harness reports this step), else None. The
    grid goes to `live` (rank 0's LiveReport). Their time is left out of the interval's throughput.
    """
    config = stage.config
    validate = validation is not None and is_due(config.validate_every, step, total_steps)
    paint = painter is not None and is_due(getattr(config, "sample_every", 0), step, total_steps)
    if not (validate or paint):
        return None
    started = time.perf_counter()
    metrics = validation_metrics(stage, engine, validation, dtype, device, config.micro_batch_size) if validate else None
    if paint:
        picture = painter.picture(engine, rank)
        if live is not None and picture is not None:
            from pipeline.core.images import encode_png

            live.image("samples", step, picture, encode_png(picture))
    accumulator.started += time.perf_counter() - started  # not training time
    return metrics


__all__ = ["VALIDATION_PREFIX", "SamplePainter", "is_due", "periodic_work", "validation_metrics"]
