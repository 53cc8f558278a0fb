"""Whole fp32 weights out of (and into) a DeepSpeed engine, whatever the ZeRO stage.

ZeRO 1/2 and bf16 keep the fp32 master copy partitioned inside the optimizer; ZeRO 3 partitions
the parameters themselves. DeepSpeed's safe_get/set_full_fp32_param reach both; they are
collectives, so every rank calls these functions.
"""

from __future__ import annotations

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param


def _is_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def full_parameter(param: torch.nn.Parameter) -> torch.Tensor:
    """The full fp32 value of one parameter (collective under ZeRO)."""
    value = safe_get_full_fp32_param(param)
    if value is None:  # ZeRO 0 in fp32: the parameter itself is the master copy
        value = param.detach()
    return value.float()


def set_full_parameter(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Overwrite one parameter everywhere: the fp32 master (used from the next step on) and, where
    the parameter is not partitioned, the working copy (used from now on). Same value on all ranks."""
    if hasattr(param, "ds_id") or getattr(param, "_hp_mapping", None) is not None:
        safe_set_full_fp32_param(param, value.to(torch.float32))
    if not _is_partitioned(param):
        param.data.copy_(value.to(param.dtype).view_as(param))


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 state dict on CPU with every parameter whole; buffers as they are (never partitioned)."""
    wanted = set(module.state_dict().keys())  # persistent entries, tied weights under every name
    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        state[name] = full_parameter(param).detach().cpu().clone()
    for name, buffer in module.named_buffers(remove_duplicate=False):
        state[name] = buffer.detach().cpu().clone()
    return {name: tensor for name, tensor in state.items() if name in wanted}
