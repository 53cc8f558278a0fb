"""Key/value cache for scale-by-scale inference.

The cache is an explicit object handed to the inference path, not state hidden inside the attention
modules (the official code toggles `kv_caching` flags on every block), so the training forward can
never pick up stale keys.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values, [B, heads, tokens so far, head_dim], grown one scale at a time."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def extend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys and values for `layer`; return everything cached for it."""
        if self.keys[layer] is not None:
            keys = torch.cat((self.keys[layer], keys), dim=2)
            values = torch.cat((self.values[layer], values), dim=2)
        self.keys[layer], self.values[layer] = keys, values
        return keys, values

    @property
    def length(self) -> int:
        """Tokens cached so far (0 before the first step)."""
        return 0 if self.keys[0] is None else int(self.keys[0].shape[2])
