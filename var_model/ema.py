"""An exponential moving average of a model's weights (the recipe's EMA 0.9999 of the tokenizer;
vaex `VAETrainer.ema_update`).

The average is kept as a plain dict of float32 tensors keyed by the model's state-dict names, so
it works from a module or from a dict of full tensors (under ZeRO-3 the pipeline hands it the
gathered parameters). Averaged: the trainable parameters. Copied as they are: buffers and frozen
parameters (a BatchNorm's running statistics have no meaningful average of their own).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def ema_decay(decay: float, num_updates: int, warmup: bool = True) -> float:
    """The decay for update number `num_updates` (0-based).

    With warm-up (vaex's rule), `min(decay, (n // 2 + 1) / (n // 2 + 10))`: 0.1 at first, 0.5 after
    16 updates, 0.9 after ~160, so a short run's average is not stuck near its random start.
    """
    if not warmup:
        return decay
    half = num_updates // 2
    return min(decay, (half + 1) / (half + 10))


def _split_module(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trainable parameters, everything else in the state dict) of a module, by state-dict name."""
    trainable = {name: p for name, p in module.named_parameters() if p.requires_grad}
    others = {name: t for name, t in module.state_dict(keep_vars=True).items() if name not in trainable}
    return trainable, others


class ExponentialMovingAverage:
    """`average = decay * average + (1 - decay) * current` for each tracked parameter.

    source: a module, or a dict name -> tensor of the parameters to average (then `buffers`, a dict
    of tensors copied as they are). device: where the average lives (default: beside the source).
    """

    def __init__(
        self, source: nn.Module | Mapping[str, torch.Tensor], decay: float = 0.9999, warmup: bool = True,
        buffers: Mapping[str, torch.Tensor] | None = None, device: torch.device | str | None = None,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay: expected a value in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.device = device
        self.num_updates = 0
        parameters, copied = self._tensors(source, buffers)
        self.averages = {name: self._stored(t, average=True) for name, t in parameters.items()}
        self.copies = {name: self._stored(t, average=False) for name, t in copied.items()}

    @staticmethod
    def _tensors(source: nn.Module | Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor] | None):
        if isinstance(source, nn.Module):
            if buffers is not None:
                raise ValueError("buffers: pass them only with a dict of parameters; a module brings its own")
            return _split_module(source)
        return dict(source), dict(buffers or {})

    def _stored(self, tensor: torch.Tensor, average: bool) -> torch.Tensor:
        # Averages are float32 whatever the training precision: 1e-4 steps vanish in bf16.
        dtype = torch.float32 if average and tensor.is_floating_point() else tensor.dtype
        return tensor.detach().to(device=self.device or tensor.device, dtype=dtype, copy=True)

    @torch.no_grad()
    def update(
        self, source: nn.Module | Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor] | None = None
    ) -> float:
        """One EMA step from the current weights (same names as at construction); returns the decay used."""
        parameters, copied = self._tensors(source, buffers)
        if parameters.keys() != self.averages.keys():
            missing, extra = self.averages.keys() - parameters.keys(), parameters.keys() - self.averages.keys()
            raise KeyError(f"EMA parameters differ from the tracked ones: missing {sorted(missing)}, new {sorted(extra)}")
        decay = ema_decay(self.decay, self.num_updates, self.warmup)
        for name, current in parameters.items():
            average = self.averages[name]
            average.lerp_(current.detach().to(device=average.device, dtype=average.dtype), 1.0 - decay)
        for name, current in copied.items():
            if name in self.copies:
                self.copies[name].copy_(current.detach())
        self.num_updates += 1
        return decay

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with the averaged parameters (float32) and the copied buffers."""
        return {**self.copies, **self.averages}

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (for export or evaluation), cast to its dtypes."""
        model.load_state_dict(self.averaged_state_dict(), strict=True)

    def state_dict(self) -> dict:
        """Everything needed to resume: the averages, the copied buffers, the decay and the update count."""
        return {
            "decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
            "parameters": {name: t.clone() for name, t in self.averages.items()},
            "buffers": {name: t.clone() for name, t in self.copies.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore exactly what `state_dict` saved; the tracked names must match."""
        for kind, ours in (("parameters", self.averages), ("buffers", self.copies)):
            theirs = state[kind]
            if ours.keys() != theirs.keys():
                raise KeyError(f"EMA {kind} in the checkpoint differ: missing {sorted(ours.keys() - theirs.keys())}, "
                               f"unexpected {sorted(theirs.keys() - ours.keys())}")
            for name, tensor in theirs.items():
                ours[name] = tensor.detach().to(device=ours[name].device, dtype=ours[name].dtype, copy=True)
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
