"""`VARConfig`: the transformer's hyper-parameters, validated on construction.

Field names are descriptive; the official names are given where they differ
(C = hidden_size, depth = num_layers, V = codebook_size, Cvae = embed_dim, patch_nums = scales).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from var_model.contract import contract_of
from var_model.tokenizer_config import TOKENIZER_PRESETS, TokenizerConfig


def total_tokens(scales: tuple[int, ...] | list[int] = (1, 2, 4, 8, 16)) -> int:
    """Tokens in the whole pyramid: sum of s*s (341 for [1,2,4,8,16], 680 for the official 10 scales)."""
    return sum(int(s) * int(s) for s in scales)


def _adaln_gamma_for_depth(depth: int) -> float:
    # README commands: --alng=1e-3 for d16/d20, 1e-4 for d24, 1e-5 for d30, 5e-6 for d36.
    if depth <= 20:
        return 1e-3
    if depth <= 24:
        return 1e-4
    if depth <= 30:
        return 1e-5
    return 5e-6


@dataclass(frozen=True)
class VARConfig:
    hidden_size: int = 512
    num_layers: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    scales: tuple[int, ...] = (1, 2, 4, 8, 16)
    codebook_size: int = 1024
    embed_dim: int = 32  # latent channels of the tokenizer (official Cvae)
    num_classes: int = 1000  # class index num_classes is the null class for guidance
    dropout: float = 0.0  # official drop_rate: after the attention projection and the MLP
    attn_dropout: float = 0.0  # official attn_drop_rate
    drop_path: float = 0.0  # largest stochastic-depth rate, spread linearly over the blocks
    cond_drop_rate: float = 0.1  # label dropout to the null class (training only)
    attn_l2_norm: bool = True
    shared_adaln: bool = False  # one AdaLN projection for all blocks (official d36-s)
    norm_eps: float = 1e-6
    init_adaln: float = 0.5  # official aln
    init_adaln_gamma: float = 1e-5  # official alng (code default; from_depth uses the README values)
    init_head: float = 0.02
    init_std: float = -1.0  # < 0: automatic sqrt(1 / (3 * hidden_size)), as the official training script

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))

        def fail(field: str, rule: str, value: Any) -> None:
            raise ValueError(f"{field}: {rule} (got {value!r})")

        for name in ("hidden_size", "num_layers", "num_heads", "embed_dim", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(name, "must be a positive integer", value)
        if self.hidden_size % self.num_heads:
            fail("num_heads", f"must divide hidden_size {self.hidden_size}", self.num_heads)
        if not (self.mlp_ratio > 0 and math.isfinite(self.mlp_ratio)):
            fail("mlp_ratio", "must be a positive number", self.mlp_ratio)
        if not self.scales:
            fail("scales", "must name at least one scale", self.scales)
        if any(s < 1 for s in self.scales):
            fail("scales", "every scale must be >= 1", self.scales)
        if any(b <= a for a, b in zip(self.scales, self.scales[1:])):
            fail("scales", "must be strictly increasing", self.scales)
        if isinstance(self.codebook_size, bool) or not isinstance(self.codebook_size, int) or self.codebook_size < 2:
            fail("codebook_size", "must be an integer >= 2", self.codebook_size)
        for name in ("dropout", "attn_dropout", "drop_path", "cond_drop_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                fail(name, "must be in [0, 1)", value)
        if not 0.0 < self.norm_eps < 1.0:
            fail("norm_eps", "must be in (0, 1)", self.norm_eps)
        for name in ("init_adaln", "init_adaln_gamma", "init_head"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0", getattr(self, name))

    @property
    def total_tokens(self) -> int:
        return total_tokens(self.scales)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_size(self) -> int:
        return round(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scales"] = list(self.scales)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VARConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"VARConfig: unknown field(s) {unknown}")
        return cls(**data)

    @classmethod
    def from_depth(cls, depth: int, **overrides: Any) -> "VARConfig":
        """The official depth parameterisation (train.py / build_vae_var).

        width 64*depth, heads = depth, MLP ratio 4, drop_path 0.1*depth/24, AdaLN gamma init from the
        README; the official 256 px tokenizer's schedule, V=4096 and embed_dim 32, 1000 classes. `overrides`
        replace any field.
        """
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth: must be a positive integer (got {depth!r})")
        values: dict[str, Any] = dict(
            hidden_size=64 * depth,
            num_layers=depth,
            num_heads=depth,
            mlp_ratio=4.0,
            **contract_of(TokenizerConfig()),  # the official vae_ch160v4096z32
            num_classes=1000,
            dropout=0.0,
            attn_dropout=0.0,
            drop_path=0.1 * depth / 24,
            cond_drop_rate=0.1,
            attn_l2_norm=True,
            shared_adaln=False,
            init_adaln=0.5,
            init_adaln_gamma=_adaln_gamma_for_depth(depth),
        )
        values.update(overrides)
        return cls(**values)


# Named presets: the transformer's own shape, paired with the tokenizer preset named beside it, whose
# scales, codebook size and latent width they take (var_model.contract: never written twice).
VAR_PRESETS: dict[str, VARConfig] = {
    "d16": VARConfig.from_depth(16),
    "d20": VARConfig.from_depth(20),
    "d24": VARConfig.from_depth(24),
    "d30": VARConfig.from_depth(30),
    "d36-s": VARConfig.from_depth(36, shared_adaln=True, **contract_of(TOKENIZER_PRESETS["official-512"])),
    # Fashion-MNIST padded to 32 px on 2 CPU cores: 2.87M parameters.
    "fashion-32": VARConfig(
        hidden_size=192, num_layers=4, num_heads=4, mlp_ratio=4.0, num_classes=10, drop_path=0.0,
        init_adaln_gamma=1e-3, **contract_of(TOKENIZER_PRESETS["fashion-32"]),
    ),
    # Smallest sensible model, for tests and smoke runs.
    "tiny": VARConfig(
        hidden_size=64, num_layers=2, num_heads=2, mlp_ratio=4.0, num_classes=10, drop_path=0.0,
        init_adaln_gamma=1e-3, **contract_of(TOKENIZER_PRESETS["tiny"]),
    ),
}
