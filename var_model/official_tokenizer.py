"""Load the released VAR tokenizer (e.g. `vae_ch160v4096z32.pth`) into our VQVAE.

The checkpoint is a plain state dict in the official key layout. Its shapes determine the
architecture; the scale schedule and image size are not stored, so they default to the official
ones for the latent grid (256 px -> 16x16 -> (1,2,3,4,5,6,8,10,13,16)).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import torch

from var_model.tokenizer_config import OFFICIAL_SCALES_256, OFFICIAL_SCALES_512, TokenizerConfig
from var_model.vqvae import VQVAE

_OFFICIAL_SCALES_BY_GRID = {16: OFFICIAL_SCALES_256, 32: OFFICIAL_SCALES_512}


class CheckpointMismatchError(ValueError):
    """The state dict's keys or shapes do not match the architecture inferred from it."""


def _require(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointMismatchError(f"missing key {key!r}: not an official VAR tokenizer state dict")
    return state[key]


def _count_indices(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def _count_levels(state: Mapping[str, torch.Tensor], prefix: str, what: str) -> int:
    """How many `<prefix><i>.` groups: 0..N-1, each with at least half the keys of group 0.

    The architecture is read from these indices, so a stray or damaged key past them (which would
    add a level and a list of every key that level lacks) is named instead.
    """
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    groups: dict[int, list[str]] = {}
    for key in state:
        if m := pattern.match(key):
            groups.setdefault(int(m.group(1)), []).append(key)
    if not groups:
        return 0
    count = 0
    while len(groups.get(count, ())) * 2 >= len(groups.get(0, ())) > 0:
        count += 1
    damaged = sorted(index for index in groups if index >= count)
    if damaged:
        keys = sorted(key for index in damaged for key in groups[index])
        shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        raise CheckpointMismatchError(
            f"damaged key {shown}: the number of {what} is read from the {prefix}<i> indices, and "
            f"{prefix}{damaged[0]} has {len(groups[damaged[0]])} keys where {prefix}0 has {len(groups.get(0, ()))}")
    return count


def infer_tokenizer_config(state: Mapping[str, torch.Tensor], *, image_size: int = 256,
                           scales: Sequence[int] | None = None) -> TokenizerConfig:
    """A TokenizerConfig whose VQVAE has exactly the shapes of `state` (official key layout)."""
    conv_in = _require(state, "encoder.conv_in.weight")
    base_channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    embed_dim = int(_require(state, "quant_conv.weight").shape[0])
    num_levels = _count_levels(state, "encoder.down.", "resolution levels")
    if num_levels == 0:
        raise CheckpointMismatchError("no encoder.down.{i} levels found: not an official VAR tokenizer state dict")
    multipliers = tuple(
        int(_require(state, f"encoder.down.{level}.block.0.conv1.weight").shape[0]) // base_channels
        for level in range(num_levels)
    )
    num_res_blocks = _count_levels(state, "encoder.down.0.block.", "residual blocks per level")
    use_attention = "encoder.mid.attn_1.qkv.weight" in state

    per_scale = _count_levels(state, "quantize.codebooks.", "per-scale codebooks")
    if per_scale:
        codebook_size = int(state["quantize.codebooks.0.weight"].shape[0])
    else:
        codebook_size = int(_require(state, "quantize.embedding.weight").shape[0])
    # Phi layout: qresi_ls.{i} partially shared, qresi shared, {i} one per scale, none = quant_resi 0.
    quant_resi, share_quant_resi = 0.5, 4
    if (count := _count_indices(state, "quantize.quant_resi.qresi_ls.")) > 0:
        share_quant_resi = count
    elif "quantize.quant_resi.qresi.weight" in state:
        share_quant_resi = 1
    elif _count_indices(state, "quantize.quant_resi.") > 0:
        share_quant_resi = 0
    else:
        quant_resi = 0.0

    downsample = 2 ** (num_levels - 1)
    if image_size % downsample != 0:
        raise ValueError(f"image_size: must be a multiple of the checkpoint's downsample factor {downsample} "
                         f"(got {image_size})")
    grid = image_size // downsample
    if scales is None:
        if grid not in _OFFICIAL_SCALES_BY_GRID:
            raise ValueError(f"scales: no official schedule for a {grid}x{grid} latent grid, pass scales= "
                             f"(got image_size {image_size})")
        scales = _OFFICIAL_SCALES_BY_GRID[grid]
    if share_quant_resi == 0 and _count_indices(state, "quantize.quant_resi.") != len(scales):
        raise CheckpointMismatchError(
            f"checkpoint has {_count_indices(state, 'quantize.quant_resi.')} per-scale Phi convs but "
            f"{len(scales)} scales were requested")
    return TokenizerConfig(
        image_size=image_size, in_channels=in_channels, scales=tuple(scales), codebook_size=codebook_size,
        embed_dim=embed_dim, base_channels=base_channels, channel_multipliers=multipliers,
        num_res_blocks=num_res_blocks, use_attention=use_attention, quant_resi=quant_resi,
        share_quant_resi=share_quant_resi, codebook_per_scale=per_scale > 0,
    )


def load_tokenizer_state_strict(model: VQVAE, state: Mapping[str, torch.Tensor]) -> None:
    """load_state_dict(strict=True) with an error that lists every missing, extra and misshapen key."""
    expected = model.state_dict()
    state = dict(state)
    # As official: a code-usage EMA recorded for another number of scales is not an error; keep ours.
    ema_key = "quantize.ema_vocab_hit_SV"
    if ema_key in state and state[ema_key].shape != expected[ema_key].shape:
        state[ema_key] = expected[ema_key]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(
        f"{key} (checkpoint {list(state[key].shape)}, model {list(expected[key].shape)})"
        for key in set(expected) & set(state) if state[key].shape != expected[key].shape
    )
    if missing or unexpected or misshapen:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        if misshapen:
            parts.append(f"shape mismatches: {', '.join(misshapen)}")
        raise CheckpointMismatchError("tokenizer state dict does not match the model; " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def load_official_tokenizer(path: str | os.PathLike | Mapping[str, torch.Tensor], *, image_size: int = 256,
                            scales: Sequence[int] | None = None, map_location: str | torch.device = "cpu") -> VQVAE:
    """The official VAR tokenizer checkpoint (a path or an already loaded state dict) as a VQVAE in eval mode.

    The file is read with torch.load(weights_only=True); the architecture is inferred from the
    shapes; every key must match (a clear CheckpointMismatchError lists the differences).
    """
    if isinstance(path, Mapping):
        state = path
    else:
        state = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
        if not isinstance(state, Mapping):
            raise CheckpointMismatchError(f"{path}: expected a state dict, got {type(state).__name__}")
    config = infer_tokenizer_config(state, image_size=image_size, scales=scales)
    model = VQVAE(config)
    load_tokenizer_state_strict(model, state)
    return model.eval()
