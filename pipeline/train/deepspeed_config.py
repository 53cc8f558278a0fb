"""The DeepSpeed config dict, built from a `TrainingConfig` and the world size.

The optimizer is a client `torch.optim.AdamW` (pipeline.train.optimizer), not DeepSpeed's
`{"optimizer": ...}` section: that section triggers a ~1 min op build on CPU (environment.md).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.train.config import TrainingConfig


def resolve_precision(config: TrainingConfig, device: torch.device) -> str:
    """"auto" -> bf16 on a GPU that supports it, fp32 otherwise; explicit choices are kept."""
    if config.precision != "auto":
        return config.precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def build_deepspeed_config(config: TrainingConfig, world_size: int, precision: str) -> dict[str, Any]:
    """ZeRO stage, precision, clipping and batch geometry for `deepspeed.initialize(config=...)`."""
    zero: dict[str, Any] = {"stage": config.zero_stage}
    if config.zero_stage >= 1:
        # Overlapping communication needs streams; on CPU (gloo) it only adds bookkeeping.
        zero["overlap_comm"] = torch.cuda.is_available()
        zero["contiguous_gradients"] = True
    if config.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if config.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": config.global_batch_size,
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps(world_size),
        "gradient_clipping": config.grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # A client optimizer that is not DeepSpeed's own: allowed explicitly for ZeRO-Offload.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # the harness reports metrics itself
        "wall_clock_breakdown": False,
    }
