"""Load a published VAR transformer checkpoint (var_d16.pth ... var_d36.pth, official key layout).

The configuration is read off the tensor shapes: width and classes from `class_emb`, depth from the
block indices, vocabulary from `head`, latent width from `word_embed`, MLP ratio from `ffn.fc1`,
shared AdaLN from `shared_ada_lin`, QK-norm and heads from `scale_mul_1H11`, and the scale schedule
from the level of every position (`lvl_1L`). Keys are checked strictly.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from typing import Mapping

import torch

from var_model.transformer import VAR
from var_model.var_config import VARConfig


def _scales_from_levels(levels: torch.Tensor) -> tuple[int, ...]:
    counts = Counter(levels.flatten().tolist())
    scales = []
    for level in range(len(counts)):
        side = math.isqrt(counts.get(level, 0))
        if side * side != counts.get(level, 0) or side == 0:
            raise ValueError(f"lvl_1L: level {level} has {counts.get(level, 0)} positions, not a square")
        scales.append(side)
    return tuple(scales)


def config_from_state_dict(state: Mapping[str, torch.Tensor]) -> VARConfig:
    """Infer the VARConfig of an official-layout state dict from its shapes."""
    required = ("class_emb.weight", "word_embed.weight", "head.weight", "lvl_1L", "blocks.0.ffn.fc1.weight")
    missing = [key for key in required if key not in state]
    if missing:
        raise KeyError(f"not an official VAR state dict: missing {missing}")
    classes_plus_null, width = state["class_emb.weight"].shape
    depth = 1 + max(int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key)))
    scale_mul = state.get("blocks.0.attn.scale_mul_1H11")
    # Without QK-norm the heads leave no trace in the shapes; official models use heads = depth.
    num_heads = int(scale_mul.shape[1]) if scale_mul is not None else depth
    depth_defaults = VARConfig.from_depth(depth)
    return VARConfig(
        hidden_size=int(width),
        num_layers=depth,
        num_heads=num_heads,
        mlp_ratio=state["blocks.0.ffn.fc1.weight"].shape[0] / width,
        scales=_scales_from_levels(state["lvl_1L"]),
        codebook_size=int(state["head.weight"].shape[0]),
        embed_dim=int(state["word_embed.weight"].shape[1]),
        num_classes=int(classes_plus_null) - 1,
        drop_path=depth_defaults.drop_path,
        attn_l2_norm=scale_mul is not None,
        shared_adaln="shared_ada_lin.1.weight" in state,
        init_adaln_gamma=depth_defaults.init_adaln_gamma,
    )


def load_official_var(path: str | os.PathLike | Mapping[str, torch.Tensor]) -> VAR:
    """Build a VAR from an official checkpoint file (or an already loaded state dict), in eval mode.

    Raises KeyError listing missing / unexpected keys, ValueError naming shape mismatches.
    """
    if isinstance(path, Mapping):
        state = dict(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    config = config_from_state_dict(state)
    with torch.device("meta"):
        expected = VAR(config).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"official VAR state dict does not match the inferred {config.num_layers}-block layout: "
                       f"missing keys {missing}, unexpected keys {unexpected}")
    wrong = [f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}"
             for key, value in expected.items() if tuple(state[key].shape) != tuple(value.shape)]
    if wrong:
        raise ValueError(f"official VAR state dict: shape mismatch: {wrong}")
    model = VAR(config)
    model.load_state_dict(state, strict=True)
    return model.eval()
