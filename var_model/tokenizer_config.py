"""Configuration of the multi-scale VQ tokenizer (VQVAE) and its named presets.

Field names follow docs/contracts.md; the official VAR names are given in the comments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Scale schedules of the released VAR models (official `patch_nums`).
OFFICIAL_SCALES_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
OFFICIAL_SCALES_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def default_channel_multipliers(num_levels: int) -> tuple[int, ...]:
    """The official (1, 1, 2, 2, 4) pattern, cut or extended to `num_levels` levels."""
    return tuple(min(2 ** (level // 2), 4) for level in range(num_levels))


@dataclass(frozen=True)
class TokenizerConfig:
    image_size: int = 256
    in_channels: int = 3
    scales: tuple[int, ...] = OFFICIAL_SCALES_256  # official v_patch_nums; last = latent grid side
    codebook_size: int = 4096  # official V / vocab_size
    embed_dim: int = 32  # latent channels, official Cvae / z_channels
    base_channels: int = 160  # official ch
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)  # official ch_mult; one level per entry
    num_res_blocks: int = 2
    use_attention: bool = True  # attention in the last level and the middle (official using_sa, using_mid_sa)
    quant_resi: float = 0.5  # Phi(h) = (1 - quant_resi) * h + quant_resi * conv3x3(h); 0 disables Phi
    share_quant_resi: int = 4  # 0: one Phi per scale, 1: one Phi for all, n > 1: n Phis shared by nearby scales
    beta: float = 0.25  # commitment weight of the VQ loss
    codebook_per_scale: bool = False  # False: one shared codebook (official); True: one codebook per scale
    dropout: float = 0.0
    norm_groups: int = 32  # GroupNorm groups (official 32); smaller only for very narrow test models

    def __post_init__(self) -> None:
        # Lists (from YAML/JSON) become tuples so the config stays hashable and comparable.
        object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))
        object.__setattr__(self, "channel_multipliers", tuple(int(m) for m in self.channel_multipliers))
        self._validate()

    def _validate(self) -> None:
        def fail(field: str, rule: str, value: Any) -> None:
            raise ValueError(f"{field}: {rule} (got {value!r})")

        for field in ("image_size", "in_channels", "embed_dim", "base_channels", "num_res_blocks", "norm_groups"):
            if getattr(self, field) < 1:
                fail(field, "must be >= 1", getattr(self, field))
        if self.codebook_size < 2:
            fail("codebook_size", "must be >= 2", self.codebook_size)
        if not self.channel_multipliers or min(self.channel_multipliers) < 1:
            fail("channel_multipliers", "must be a non-empty sequence of integers >= 1", self.channel_multipliers)
        if not self.scales or min(self.scales) < 1:
            fail("scales", "must be a non-empty sequence of integers >= 1", self.scales)
        if any(b <= a for a, b in zip(self.scales, self.scales[1:])):
            fail("scales", "must be strictly increasing", self.scales)
        if self.image_size % self.downsample_factor != 0:
            fail("image_size", f"must be a multiple of the downsample factor {self.downsample_factor}", self.image_size)
        grid = self.image_size // self.downsample_factor
        if self.scales[-1] != grid:
            fail("scales", f"must end at the latent grid size image_size / {self.downsample_factor} = {grid}", self.scales)
        for multiplier in self.channel_multipliers:
            width = self.base_channels * multiplier
            if width % self.norm_groups != 0:
                fail("base_channels", f"every level width (base_channels * multiplier) must be divisible by "
                     f"norm_groups {self.norm_groups}, level width {width} is not", self.base_channels)
        if not 0.0 <= self.quant_resi <= 1.0:
            fail("quant_resi", "must be in [0, 1]", self.quant_resi)
        if self.share_quant_resi < 0:
            fail("share_quant_resi", "must be >= 0", self.share_quant_resi)
        if self.beta < 0:
            fail("beta", "must be >= 0", self.beta)
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", "must be in [0, 1)", self.dropout)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def latent_size(self) -> int:
        return self.scales[-1]

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def total_tokens(self) -> int:
        return sum(s * s for s in self.scales)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["scales"] = list(self.scales)
        data["channel_multipliers"] = list(self.channel_multipliers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TokenizerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown TokenizerConfig field (got {data[unknown[0]]!r})")
        return cls(**data)

    def replace(self, **changes: Any) -> "TokenizerConfig":
        return dataclasses.replace(self, **changes)


TOKENIZER_PRESETS: dict[str, TokenizerConfig] = {
    # The released VAR tokenizer vae_ch160v4096z32 (108,948,355 parameters) at 256 px ...
    "official-256": TokenizerConfig(),
    # ... and the same weights with the 512 px schedule (32x32 latent).
    "official-512": TokenizerConfig(image_size=512, scales=OFFICIAL_SCALES_512),
    # 32x32 grayscale (Fashion-MNIST padded to 32): 8x8 latent, 6 scales; trains in minutes on 2 CPU cores.
    "fashion-32": TokenizerConfig(
        image_size=32, in_channels=1, scales=(1, 2, 3, 4, 6, 8), codebook_size=512, embed_dim=16,
        base_channels=32, channel_multipliers=(1, 1, 2), num_res_blocks=1, use_attention=True,
    ),
    # The same layout at half the width and without attention: ~0.2M parameters, for tests and
    # one-minute demos (about 19 dB PSNR on Fashion-MNIST after 60 s on one loaded CPU core).
    "tiny": TokenizerConfig(
        image_size=32, in_channels=1, scales=(1, 2, 3, 4, 6, 8), codebook_size=256, embed_dim=16,
        base_channels=16, channel_multipliers=(1, 1, 2), num_res_blocks=1, use_attention=False, norm_groups=8,
    ),
}
