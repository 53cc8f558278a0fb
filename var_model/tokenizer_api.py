"""The seed's (Edifice) tokenizer API: `build_tokenizer(...) -> (encoder, decoder)`.

Both modules wrap one shared VQVAE, so training either trains the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from var_model.tokenizer_config import TokenizerConfig, default_channel_multipliers
from var_model.vqvae import VQVAE


class TokenEncoder(nn.Module):
    """images [B, C, H, W] float in [-1, 1] -> list of LongTensor [B, s, s], one per scale."""

    def __init__(self, tokenizer: VQVAE) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.tokenizer.encode_tokens(images)


class TokenDecoder(nn.Module):
    """list of LongTensor [B, s, s] (one per scale) -> images [B, C, H, W] in [-1, 1]."""

    def __init__(self, tokenizer: VQVAE) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, token_maps: list[torch.Tensor]) -> torch.Tensor:
        return self.tokenizer.decode_tokens(token_maps)


def build_tokenizer(image_size: int = 256, scales: Sequence[int] = (1, 2, 4, 8, 16), codebook_size: int = 1024,
                    embed_dim: int = 256, in_channels: int = 3, **config_fields: Any) -> tuple[TokenEncoder, TokenDecoder]:
    """Build a multi-scale VQ tokenizer with the seed's defaults; returns (encoder, decoder).

    Other TokenizerConfig fields (base_channels, channel_multipliers, num_res_blocks, ...) pass
    through. Without channel_multipliers the number of levels follows image_size / scales[-1]
    with the official (1, 1, 2, 2, 4) pattern, so the defaults give the official 16x trunk.
    """
    if "channel_multipliers" not in config_fields and scales and image_size % scales[-1] == 0:
        factor = image_size // scales[-1]
        if factor >= 1 and factor & (factor - 1) == 0:  # a power of two: one level per halving
            config_fields["channel_multipliers"] = default_channel_multipliers(int(math.log2(factor)) + 1)
    config = TokenizerConfig(image_size=image_size, scales=tuple(scales), codebook_size=codebook_size,
                             embed_dim=embed_dim, in_channels=in_channels, **config_fields)
    tokenizer = VQVAE(config)
    return TokenEncoder(tokenizer), TokenDecoder(tokenizer)
