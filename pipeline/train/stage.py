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

    def zero3_leaf_modules(self) -> list[type[torch.nn.Module]]:
        """Module classes ZeRO-3 should gather as a whole (they read child weights outside forward)."""
        return []

    @abstractmethod
    def compute_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                     dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to backpropagate, detached metrics to average over the log interval; 0-d or 1-d)."""

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

    def export_extra(self) -> dict[str, Any]:
        """Called on every rank before the export: extra fields for the export's config.json."""
        return {}

    @abstractmethod
    def export(self, model: torch.nn.Module, uri: str, extra: dict[str, Any]) -> str:
        """Write the consolidated fp32 model under `uri`; returns the weights checksum."""
