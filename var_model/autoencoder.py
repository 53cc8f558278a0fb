"""The tokenizer's CNN encoder and decoder: the LDM (VQGAN vq-f16) layout used by the official VAR.

Module attribute names (conv_in, down.{i}.block.{j}.norm1, mid.attn_1, up.{i}.upsample.conv, ...)
are the official ones, because they are the keys of the released state dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> dropout -> conv3x3, plus a (1x1-projected) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, norm_groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # Only a width change needs a projection; an Identity adds no state-dict keys.
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, one 1x1 conv for q, k, v; residual."""

    def __init__(self, channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(batch, 3, channels, height * width).unbind(1)
        # [B, HW, C] layout for attention; the softmax scale is C^-0.5 as in the official block.
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=channels ** -0.5
        )
        attended = attended.transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    """Halve the resolution: zero-pad right and bottom by one, then a 3x3 stride-2 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MiddleBlock(nn.Module):
    """res -> attention -> res at the lowest resolution (state-dict names block_1, attn_1, block_2)."""

    def __init__(self, channels: int, use_attention: bool, dropout: float, norm_groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm_groups)
        self.attn_1 = AttnBlock(channels, norm_groups) if use_attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: residual blocks, each optionally followed by attention, then a resampler."""

    def __init__(self, widths: list[tuple[int, int]], use_attention: bool, resample: nn.Module | None,
                 resample_name: str, dropout: float, norm_groups: int) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o, dropout, norm_groups) for i, o in widths)
        self.attn = nn.ModuleList(AttnBlock(o, norm_groups) for _, o in widths) if use_attention else nn.ModuleList()
        self.resample_name = resample_name
        if resample is not None:
            # Registered as `downsample` or `upsample`, the official names.
            self.add_module(resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[index](x)
        resample = getattr(self, self.resample_name, None)
        return resample(x) if resample is not None else x


class Encoder(nn.Module):
    """images [B, in_channels, H, W] -> latents [B, z_channels, H / 2^(levels-1), W / 2^(levels-1)]."""

    def __init__(self, *, base_channels: int, channel_multipliers: tuple[int, ...], num_res_blocks: int,
                 in_channels: int, z_channels: int, use_attention: bool, dropout: float, norm_groups: int) -> None:
        super().__init__()
        num_levels = len(channel_multipliers)
        self.conv_in = nn.Conv2d(in_channels, base_channels, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        width = base_channels
        for level, multiplier in enumerate(channel_multipliers):
            out_width = base_channels * multiplier
            widths = [(width if j == 0 else out_width, out_width) for j in range(num_res_blocks)]
            last = level == num_levels - 1
            self.down.append(Level(
                widths, use_attention=use_attention and last,
                resample=None if last else Downsample(out_width), resample_name="downsample",
                dropout=dropout, norm_groups=norm_groups,
            ))
            width = out_width
        self.mid = MiddleBlock(width, use_attention, dropout, norm_groups)
        self.norm_out = group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, z_channels, kernel_size=3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(images)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """latents [B, z_channels, h, w] -> images [B, out_channels, h * 2^(levels-1), w * 2^(levels-1)]."""

    def __init__(self, *, base_channels: int, channel_multipliers: tuple[int, ...], num_res_blocks: int,
                 out_channels: int, z_channels: int, use_attention: bool, dropout: float, norm_groups: int) -> None:
        super().__init__()
        num_levels = len(channel_multipliers)
        width = base_channels * channel_multipliers[-1]
        self.conv_in = nn.Conv2d(z_channels, width, kernel_size=3, padding=1)
        self.mid = MiddleBlock(width, use_attention, dropout, norm_groups)
        # Built from the coarsest level down but stored finest-first, so up.{i} mirrors encoder down.{i}.
        levels: list[Level] = []
        for level in reversed(range(num_levels)):
            out_width = base_channels * channel_multipliers[level]
            # The decoder has one more residual block per level than the encoder (LDM layout).
            widths = [(width if j == 0 else out_width, out_width) for j in range(num_res_blocks + 1)]
            levels.insert(0, Level(
                widths, use_attention=use_attention and level == num_levels - 1,
                resample=Upsample(out_width) if level != 0 else None, resample_name="upsample",
                dropout=dropout, norm_groups=norm_groups,
            ))
            width = out_width
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, out_channels, kernel_size=3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(latents))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))
