"""AdamW with the reference's weight-decay groups, and the reference's lr / weight-decay schedule.

Official VAR (utils/lr_control.py): no weight decay for 1-D parameters, biases and the named
embeddings/scales; lr warms up linearly from 0.005x, then "lin0" holds it flat for 5% of the
remaining steps and decays it linearly to `final_lr_fraction`; weight decay follows a half cosine from
`weight_decay` to `final_weight_decay` over the whole run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from pipeline.train.config import TrainingConfig

# Name fragments that never get weight decay (reference: pos_*, lvl_embed, scale_mul, ada_gss);
# stages add their own (e.g. the tokenizer's codebook).
NO_DECAY_KEYS = ("pos_", "lvl_embed", "level_embed", "scale_mul", "ada_gss")
FLAT_FRACTION = 0.05  # "lin0": flat for the first 5% after warmup


def parameter_groups(model: torch.nn.Module, no_decay_keys: Iterable[str] = NO_DECAY_KEYS) -> list[dict]:
    """Two AdamW groups: decayed matrices and everything else (wd_scale 0)."""
    keys = tuple(no_decay_keys)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith("bias") or any(key in name for key in keys):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "wd_scale": 1.0, "name": "decay"},
              {"params": no_decay, "wd_scale": 0.0, "name": "no_decay"}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: torch.nn.Module, config: TrainingConfig,
                    no_decay_keys: Iterable[str] = NO_DECAY_KEYS) -> torch.optim.AdamW:
    groups = parameter_groups(model, no_decay_keys)
    for group in groups:
        group["weight_decay"] = config.weight_decay * group["wd_scale"]
    # foreach: one fused kernel per group on GPU; plain loops on CPU are no faster.
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas, weight_decay=config.weight_decay)


class ReferenceLRFactor:
    """lr multiplier at optimizer step `step` (0-based), as the reference's lr_wd_annealing('lin0')."""

    def __init__(self, total_steps: int, warmup_steps: int, start_factor: float, final_factor: float):
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.start_factor = start_factor
        self.final_factor = final_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_factor + (1 - self.start_factor) * step / self.warmup_steps
        decay_span = max(self.total_steps - 1 - self.warmup_steps, 1)
        passed = min((step - self.warmup_steps) / decay_span, 1.0)
        if passed < FLAT_FRACTION:
            return 1.0
        return self.final_factor + (1 - self.final_factor) * (1 - passed) / (1 - FLAT_FRACTION)


class ReferenceSchedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR with the reference lr factor that also anneals each group's weight decay.

    DeepSpeed steps it once per optimizer step and keeps its state in checkpoints.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainingConfig, total_steps: int):
        self.total_steps = total_steps
        self.start_weight_decay = config.weight_decay
        self.final_weight_decay = config.weight_decay if config.final_weight_decay is None else config.final_weight_decay
        factor = ReferenceLRFactor(total_steps, config.warmup_length(total_steps),
                                   config.warmup_start_factor, config.final_lr_fraction)
        super().__init__(optimizer, factor)

    def weight_decay_at(self, step: int) -> float:
        passed = min(step / max(self.total_steps - 1, 1), 1.0)
        span = self.start_weight_decay - self.final_weight_decay
        return self.final_weight_decay + span * (0.5 + 0.5 * math.cos(math.pi * passed))

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        self._set_weight_decay()

    def _set_weight_decay(self) -> None:
        weight_decay = self.weight_decay_at(self.last_epoch)
        for group in self.optimizer.param_groups:
            group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)

    # Only the position is saved: the shape of the schedule comes from the config, so a run resumed
    # with more steps follows its new schedule from where it stopped.
    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch = state_dict["last_epoch"]
        self._step_count = state_dict["_step_count"]
        factor = self.lr_lambdas[0](self.last_epoch)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self._set_weight_decay()


def build_schedule(optimizer: torch.optim.Optimizer, config: TrainingConfig, total_steps: int) -> ReferenceSchedule:
    return ReferenceSchedule(optimizer, config, total_steps)
