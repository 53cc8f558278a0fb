"""How tokens are drawn at generation time, as one value: guidance weight, top-k, top-p, and where
guidance is skipped.

The defaults are the official FID settings (VAR's README: cfg 1.5, top-k 900, top-p 0.96). Every
place that samples (sample grids, generated sets, evaluation) takes a `SamplingSettings`, so these
numbers live here only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplingSettings:
    cfg: float = 1.5  # classifier-free guidance weight, ramped linearly over the scales; 0: no guidance
    top_k: int = 900  # keep the k most likely codes; 0 disables (capped at the codebook size)
    top_p: float = 0.96  # then the smallest nucleus holding this much probability; 0 or 1 keeps all
    # A training-free speed-up, off by default (0: the official sampler): the last N scales are drawn
    # from the conditional logits alone, without the null-class half of the batch. They hold most of
    # the tokens (16x16 is 256 of the 680 at 256 px), so N=1 saves about a third of the transformer.
    unguided_last_scales: int = 0
    # FastVAR-style pruning, off by default: at the last N scales only the `prune_keep` share of the
    # tokens still changing is recomputed, the others take the previous scale's logits (token_pruning).
    pruned_last_scales: int = 0
    prune_keep: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cfg) and self.cfg >= 0):
            raise ValueError(f"cfg: must be a finite number >= 0 (got {self.cfg})")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, 0 disables (got {self.top_k})")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p: must be in [0, 1], 0 disables (got {self.top_p})")
        if self.unguided_last_scales < 0:
            raise ValueError(f"unguided_last_scales: must be >= 0, 0 guides every scale (got {self.unguided_last_scales})")
        if self.pruned_last_scales < 0:
            raise ValueError(f"pruned_last_scales: must be >= 0, 0 prunes nothing (got {self.pruned_last_scales})")
        if not 0 < self.prune_keep <= 1:
            raise ValueError(f"prune_keep: must be in (0, 1], the share of tokens recomputed (got {self.prune_keep})")

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `generate`."""
        return dataclasses.asdict(self)


OFFICIAL_FID_SAMPLING = SamplingSettings()  # what VAR's paper reports FID with
NO_GUIDANCE_SAMPLING = SamplingSettings(cfg=0.0, top_k=0, top_p=1.0)  # the model's own distribution
