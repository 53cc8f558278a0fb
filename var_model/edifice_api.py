"""The seed's functional API (Edifice.Generative.VAR) on top of the faithful VAR.

- `build(...) -> VAR` with the seed's defaults.
- `next_scale_prediction(model, params, current_tokens, scale_idx, labels, tokenizer=...)`.
- `total_tokens(scales)` and `recommended_defaults()`.

Unlike the seed, the transformer reads code vectors, not token ids: scale k's input is built from the
tokens of scales < k through the tokenizer's codebook and Phi convs (official vae_quant_proxy). So
`next_scale_prediction` takes the tokenizer as an explicit argument; nothing is attached to the model.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch.func import functional_call

from var_model.generation import label_batch
from var_model.transformer import VAR
from var_model.var_config import VARConfig, total_tokens
from var_model.vqvae import VQVAE

__all__ = ["build", "next_scale_prediction", "total_tokens", "recommended_defaults"]

_SEED_DEFAULTS: dict[str, Any] = {
    "hidden_size": 512,
    "num_layers": 12,
    "num_heads": 8,
    "mlp_ratio": 4.0,
    "scales": [1, 2, 4, 8, 16],
    "codebook_size": 1024,
}


def recommended_defaults() -> dict[str, Any]:
    """The seed's recommended_defaults (a fresh dict each call)."""
    return {key: list(value) if isinstance(value, list) else value for key, value in _SEED_DEFAULTS.items()}


def build(
    hidden_size: int = 512,
    num_layers: int = 12,
    num_heads: int = 8,
    mlp_ratio: float = 4.0,
    scales: list[int] | tuple[int, ...] = (1, 2, 4, 8, 16),
    codebook_size: int = 1024,
    dropout: float = 0.1,
    num_classes: int = 1000,
    embed_dim: int = 256,
    **more: Any,
) -> VAR:
    """A VAR transformer with the seed's defaults. `embed_dim` must equal the tokenizer's (256 pairs with
    the seed's build_tokenizer default); `more` sets any other VARConfig field (drop_path, shared_adaln, ...)."""
    config = VARConfig(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        scales=tuple(scales),
        codebook_size=codebook_size,
        dropout=dropout,
        num_classes=num_classes,
        embed_dim=embed_dim,
        **more,
    )
    return VAR(config)


def prefix_teacher_input(tokenizer: VQVAE, token_maps: list[torch.Tensor]) -> torch.Tensor:
    """Transformer inputs for scales 1..k from the token maps of scales 0..k-1: [B, sum_{1..k} s^2, embed_dim].

    The same per-scale step that generation uses; with all K-1 coarser maps it equals
    `tokenizer.teacher_forcing_input`.
    """
    quantizer = tokenizer.quantize
    batch = token_maps[0].shape[0]
    side = quantizer.latent_size
    accumulated = torch.zeros(batch, tokenizer.config.embed_dim, side, side, device=token_maps[0].device)
    inputs = []
    for scale_index, tokens in enumerate(token_maps):
        codes = quantizer.embed_tokens(tokens, scale_index).float()
        accumulated, next_input = quantizer.next_autoregressive_input(scale_index, accumulated, codes)
        inputs.append(next_input)
    return torch.cat(inputs, dim=1)


def next_scale_prediction(
    model: VAR,
    params: Mapping[str, torch.Tensor] | None,
    current_tokens: list[torch.Tensor],
    scale_idx: int,
    labels: torch.Tensor | int | None,
    tokenizer: VQVAE | None = None,
) -> torch.Tensor:
    """Logits [B, s_k^2, V] for scale k = scale_idx from the token maps of scales 0..k-1.

    params: None uses the module's own weights; a state dict (all or some entries) is applied with
    torch.func.functional_call, leaving the module untouched. current_tokens: at least k maps
    [B, s, s] (extra finer maps are ignored). tokenizer: needed for k >= 1 (its codebook embeds the
    tokens). Runs the teacher-forced path on the prefix (no KV cache), in the module's current mode.
    labels: int64 [B], or as in `generate` a single int for the batch or None (unconditional); the
    batch is then that of current_tokens (1 at scale 0 without tokens).
    """
    scales = model.config.scales
    if not 0 <= scale_idx < len(scales):
        raise ValueError(f"scale_idx: must be in [0, {len(scales)}) (got {scale_idx})")
    if len(current_tokens) < scale_idx:
        raise ValueError(f"current_tokens: scale {scale_idx} needs {scale_idx} coarser token maps (got {len(current_tokens)})")
    if not isinstance(labels, torch.Tensor):
        batch = current_tokens[0].shape[0] if current_tokens else 1
        device = current_tokens[0].device if current_tokens else model.pos_1LC.device
        labels = label_batch(labels, model.config.num_classes, batch).to(device)
    if scale_idx == 0:
        teacher_input = torch.zeros(labels.shape[0], 0, model.config.embed_dim, device=labels.device)
    else:
        if tokenizer is None:
            raise ValueError("tokenizer: required for scale_idx >= 1 (its codebook embeds the coarser tokens)")
        teacher_input = prefix_teacher_input(tokenizer, list(current_tokens[:scale_idx]))
    if params is None:
        logits = model(labels, teacher_input)
    else:
        logits = functional_call(model, dict(params), (labels, teacher_input))
    begin, end = model.scale_bounds[scale_idx]
    return logits[:, begin:end]
