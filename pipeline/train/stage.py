"""What a training stage tells the harness: its model, its loss, its hooks and its export.

A stage object is pickled into every Ray Train worker; per-worker state (a frozen tokenizer, code
hit counters) is created in `setup_worker`, not in `__init__`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from pipeline.train.config import TrainingConfig
from pipeline.train.optimizer import NO_DECAY_KEYS


class TrainingStage(ABC):
    name: str = "stage"
    #: dataset columns the loss reads; everything else is dropped before the trainer sees the data
    columns: tuple[str, ...] = ()
    #: parameter-name fragments that get no weight decay
    no_decay_keys: tuple[str, ...] = NO_DECAY_KEYS

    def __init__(self, config: TrainingConfig):
        self.config = config

    def batch_options(self) -> dict[str, Any]:
        """Extra keyword arguments for `iter_torch_batches` (e.g. a local shuffle buffer)."""
        return {}

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A freshly initialised model (same on every rank: the harness seeds before calling)."""

    def setup_worker(self, device: torch.device) -> None:
        """Per-worker preparation before training (load frozen helpers, reset counters)."""

    def setup_engine(self, engine: Any) -> None:
        """Called once the DeepSpeed engine exists (before any checkpoint is loaded)."""

    def setup_auxiliary(self, engine: Any, world_size: int, precision: str, total_steps: int) -> None:
        """Called after `setup_engine`, before any checkpoint is loaded: networks and state the stage
        trains besides the model (e.g. a discriminator engine, an EMA), saved by `save_auxiliary`."""

    def zero3_leaf_modules(self) -> list[type[torch.nn.Module]]:
        """Module classes ZeRO-3 should gather as a whole (they read child weights outside forward)."""
        return []

    @abstractmethod
    def compute_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                     dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to backpropagate, detached metrics to average over the log interval; 0-d or 1-d)."""

    def before_micro_batch(self, step: int) -> None:
        """Called on every rank before each micro-batch; `step` is the number of finished optimizer steps."""

    def after_micro_batch(self) -> dict[str, torch.Tensor]:
        """Called on every rank after the model engine's step() of each micro-batch (e.g. a second
        network's step); detached metrics to average over the log interval, like compute_loss's."""
        return {}

    def after_optimizer_step(self, engine: Any, step: int) -> dict[str, float]:
        """Called on every rank after each optimizer step (collectives allowed); extra metrics."""
        return {}

    def interval_metrics(self) -> dict[str, float]:
        """Called on every rank at each log step (collectives allowed); rank 0's values are reported."""
        return {}

    def stop_reason(self, step: int) -> str | None:
        """Called on rank 0 at each log step and before the export: a one-line reason to stop the
        stage without exporting (e.g. it lost too many samples), or None to go on."""
        return None

    def save_auxiliary(self, folder: str, rank: int) -> None:
        """Collective: write the auxiliary state (`setup_auxiliary`) into a checkpoint folder, beside
        the model engine's; every .pt file must load with torch.load(weights_only=True)."""

    def load_auxiliary(self, folder: str, rank: int, where: str) -> None:
        """Restore what `save_auxiliary` wrote, from a checkpoint folder (`where`: its URI, for messages)."""

    def export_state_dict(self, engine: Any) -> dict[str, torch.Tensor]:
        """Collective: the whole fp32 state dict the export holds (default: the trained weights)."""
        from pipeline.train.weights import full_state_dict

        return full_state_dict(engine.module)

    def export_extra(self) -> dict[str, Any]:
        """Called on every rank before the export: extra fields for the export's config.json."""
        return {}

    @abstractmethod
    def export(self, model: torch.nn.Module, uri: str, extra: dict[str, Any]) -> str:
        """Write the consolidated fp32 model under `uri`; returns the weights checksum."""
