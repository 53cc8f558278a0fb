"""Load a published VAR transformer checkpoint (var_d16.pth ... var_d36.pth, official key layout).

The configuration is read off the tensor shapes: width and classes from `class_emb`, depth from the
block indices, vocabulary from `head`, latent width from `word_embed`, MLP ratio from `ffn.fc1`,
shared AdaLN from `shared_ada_lin`, QK-norm and heads from `scale_mul_1H11`, and the scale schedule
from the level of every position (`lvl_1L`). Keys are checked strictly.

A damaged key that the architecture is read from is named, not turned into a wrong architecture
(a stray `blocks.N.` key would otherwise add a block). Without QK-norm the heads leave no trace in
the shapes: such a checkpoint needs `num_heads` given.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from typing import Mapping

import torch

from var_model.official_tokenizer import CheckpointMismatchError
from var_model.transformer import VAR
from var_model.var_config import VARConfig

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def _scales_from_levels(levels: torch.Tensor) -> tuple[int, ...]:
    counts = Counter(levels.flatten().tolist())
    scales = []
    for level in range(len(counts)):
        side = math.isqrt(counts.get(level, 0))
        if side * side != counts.get(level, 0) or side == 0:
            raise ValueError(f"lvl_1L: level {level} has {counts.get(level, 0)} positions, not a square")
        scales.append(side)
    return tuple(scales)


def _depth(state: Mapping[str, torch.Tensor]) -> int:
    """The number of blocks, read from the block indices: 0..N-1, each holding most of block 0's keys.

    A block index beyond them (a stray or damaged `blocks.N.` key, a gap) is named, rather than
    inferring a deeper model and listing every key it lacks. Keys missing inside a counted block are
    left to the strict key check, which names them.
    """
    blocks: dict[int, set[str]] = {}
    for key in state:
        if m := _BLOCK_KEY.match(key):
            blocks.setdefault(int(m.group(1)), set()).add(m.group(2))
    reference = blocks[0]
    depth = 0
    while len(blocks.get(depth, set()) & reference) * 2 > len(reference):
        depth += 1
    damaged = sorted(index for index in blocks if index >= depth)
    if damaged:
        keys = sorted(f"blocks.{index}.{suffix}" for index in damaged for suffix in blocks[index])
        shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        raise CheckpointMismatchError(
            f"official VAR state dict: damaged block keys {shown}: blocks 0-{depth - 1} are complete, the depth is "
            f"read from the block indices, and block {damaged[0]} has {len(blocks[damaged[0]] & reference)} of "
            f"block 0's {len(reference)} keys")
    return depth


def _width(state: Mapping[str, torch.Tensor]) -> int:
    """The model width; every key it is read from must agree, else the odd one is named."""
    witnesses = {"class_emb.weight": state["class_emb.weight"].shape[-1],
                 "word_embed.weight": state["word_embed.weight"].shape[0],
                 "head.weight": state["head.weight"].shape[-1],
                 "blocks.0.ffn.fc1.weight": state["blocks.0.ffn.fc1.weight"].shape[-1]}
    for key in ("pos_start", "pos_1LC"):
        if key in state:
            witnesses[key] = state[key].shape[-1]
    counts = Counter(witnesses.values())
    width, votes = counts.most_common(1)[0]
    odd = [f"{key} {tuple(state[key].shape)}" for key, value in witnesses.items() if value != width]
    if odd:
        raise CheckpointMismatchError(f"official VAR state dict: the width is {width} by {votes} of its keys but "
                                      f"{', '.join(odd)} disagree{'s' if len(odd) == 1 else ''}")
    return int(width)


def config_from_state_dict(state: Mapping[str, torch.Tensor], num_heads: int | None = None) -> VARConfig:
    """Infer the VARConfig of an official-layout state dict from its shapes.

    `num_heads` is read from the QK-norm scales (`scale_mul_1H11`); a checkpoint without QK-norm
    needs it given. Given for a QK-norm checkpoint, it must agree.
    """
    required = ("class_emb.weight", "word_embed.weight", "head.weight", "lvl_1L", "blocks.0.ffn.fc1.weight")
    missing = [key for key in required if key not in state]
    if missing:
        raise KeyError(f"not an official VAR state dict: missing {missing}")
    classes_plus_null = state["class_emb.weight"].shape[0]
    width = _width(state)
    depth = _depth(state)
    scale_mul = state.get("blocks.0.attn.scale_mul_1H11")
    if scale_mul is not None:
        if num_heads is not None and num_heads != int(scale_mul.shape[1]):
            raise CheckpointMismatchError(f"num_heads: {num_heads} given but the checkpoint's QK-norm scales "
                                          f"(blocks.0.attn.scale_mul_1H11 {tuple(scale_mul.shape)}) have "
                                          f"{int(scale_mul.shape[1])} heads")
        num_heads = int(scale_mul.shape[1])
    elif num_heads is None:
        raise CheckpointMismatchError(
            "num_heads: this checkpoint has no QK-norm (no blocks.0.attn.scale_mul_1H11), so its number of "
            "attention heads is not in its shapes; pass num_heads= (official models use num_heads = depth "
            f"= {depth})")
    elif width % num_heads:
        raise CheckpointMismatchError(f"num_heads: {num_heads} does not divide the width {width}")
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


def load_official_var(path: str | os.PathLike | Mapping[str, torch.Tensor], *, num_heads: int | None = None) -> VAR:
    """Build a VAR from an official checkpoint file (or an already loaded state dict), in eval mode.

    `num_heads`: required for a checkpoint without QK-norm (see `config_from_state_dict`).
    Raises KeyError listing missing / unexpected keys, ValueError naming shape mismatches or a
    damaged key the architecture is read from (CheckpointMismatchError).
    """
    if isinstance(path, Mapping):
        state = dict(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    config = config_from_state_dict(state, num_heads)
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
