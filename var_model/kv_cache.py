"""Key/value cache for scale-by-scale inference.

The cache is an explicit object handed to the inference path, not state hidden inside the attention
modules (the official code toggles `kv_caching` flags on every block), so the training forward can
never pick up stale keys.

With a `capacity` (the pyramid length, as `VAR.new_cache` gives) each layer's keys and values are
written into one buffer allocated at the first step, instead of concatenating everything cached so
far at every step. The cache also remembers per-sequence values that do not change from step to step
(the AdaLN modulations of the class condition), see `memo`.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


class KVCache:
    """Per-layer keys and values, [B, heads, tokens so far, head_dim], grown one scale at a time."""

    def __init__(self, num_layers: int, capacity: int | None = None) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.capacity = capacity
        self._buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self._memo: dict[object, tuple[torch.Tensor, object]] = {}

    def extend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys and values for `layer`; return everything cached for it."""
        cached = 0 if self.keys[layer] is None else self.keys[layer].shape[2]
        end = cached + keys.shape[2]
        if self.capacity is not None and end <= self.capacity:
            if cached == 0:
                shape = (keys.shape[0], keys.shape[1], self.capacity, keys.shape[3])
                self._buffers[layer] = (keys.new_empty(shape), values.new_empty(shape))
            buffers = self._buffers[layer]
            buffers[0][:, :, cached:end] = keys
            buffers[1][:, :, cached:end] = values
            keys, values = buffers[0][:, :, :end], buffers[1][:, :, :end]
        elif self.keys[layer] is not None:
            keys = torch.cat((self.keys[layer], keys), dim=2)
            values = torch.cat((self.values[layer], values), dim=2)
        self.keys[layer], self.values[layer] = keys, values
        return keys, values

    def memo(self, key: object, argument: torch.Tensor, compute: Callable[[], T]) -> T:
        """compute(), remembered for this sequence while it is asked with the same `argument` tensor."""
        hit = self._memo.get(key)
        if hit is not None and hit[0] is argument:
            return hit[1]  # type: ignore[return-value]
        value = compute()
        self._memo[key] = (argument, value)
        return value

    def keep_rows(self, count: int) -> None:
        """Keep the first `count` sequences of the batch from here on (e.g. guidance's conditional half)."""
        for layer, buffers in enumerate(self._buffers):
            if self.keys[layer] is not None:
                self.keys[layer], self.values[layer] = self.keys[layer][:count], self.values[layer][:count]
            if buffers is not None:
                self._buffers[layer] = (buffers[0][:count], buffers[1][:count])
        self._memo.clear()

    @property
    def length(self) -> int:
        """Tokens cached so far (0 before the first step)."""
        return 0 if self.keys[0] is None else int(self.keys[0].shape[2])
