"""The tokenizer's CNN encoder and decoder: the LDM (VQGAN vq-f16) layout used by the official VAR.

Module attribute names (conv_in, down.{i}.block.{j}.norm1, mid.attn_1, up.{i}.upsample.conv, ...)
are the official ones, because they are the keys of the released state dict.

The decoder has an inference path (`Decoder.forward` when no gradient is recorded, e.g. under
`torch.no_grad()` / `torch.inference_mode()`; `Decoder.fast_inference = False` switches it off). It
computes the same function, equal within float rounding (tests/var_model/test_fast_paths.py):
- activations in channels_last (NHWC) memory, which the CPU convolutions run on without reordering
  every tensor to their blocked layout and back; 1x1 convolutions as matrix products on the NHWC rows;
- each nearest-2x upsample + 3x3 conv as one 2x2 conv at the low resolution with four output phases
  (the folded weights, cached until the weights change): 16 instead of 36 multiply-adds per input
  pixel and channel pair, and no upsampled copy;
- SiLU and the residual sum in place on tensors the block itself made.
`Decoder.compile_inference()` adds an optional torch.compile of that path (off by default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def nhwc(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H, W, C] view (contiguous when x is channels_last)."""
    return x.permute(0, 2, 3, 1)


def nhwc_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C] rows (a view when x is channels_last)."""
    batch, channels, height, width = x.shape
    return nhwc(x).reshape(batch, height * width, channels)


def from_nhwc_rows(rows: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, H*W, C] -> a channels_last [B, C, H, W] view of the same memory."""
    batch, _, channels = rows.shape
    return rows.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


def pointwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv as a matrix product over the pixels (channels_last in and out)."""
    _, _, height, width = x.shape
    weight = conv.weight.view(conv.out_channels, conv.in_channels)
    return from_nhwc_rows(F.linear(nhwc_rows(x), weight, conv.bias), height, width)


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

    def inference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """forward without autograd, channels_last: in-place SiLU and sum; 1x1 shortcut as a matmul."""
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        shortcut = pointwise_conv(self.nin_shortcut, x) if isinstance(self.nin_shortcut, nn.Conv2d) else x
        return h.add_(shortcut)


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

    def inference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """forward on channels_last activations: q, k, v and the output projection as matmuls on the
        [B, HW, C] rows that NHWC memory already is (no transposes)."""
        batch, channels, height, width = x.shape
        rows = nhwc_rows(self.norm(x))  # [B, HW, C]
        qkv = F.linear(rows, self.qkv.weight.view(3 * channels, channels), self.qkv.bias)
        q, k, v = qkv.view(batch, 1, height * width, 3, channels).unbind(3)  # single head
        attended = F.scaled_dot_product_attention(q, k, v, scale=channels ** -0.5).view(batch, height * width, channels)
        out = F.linear(attended, self.proj_out.weight.view(channels, channels), self.proj_out.bias)
        return from_nhwc_rows(out, height, width).add_(x)


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

    def inference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same function without the upsampled copy: a 2x2 conv per output phase at low resolution.

        Output pixel (2i+a, 2j+b) of conv3x3(nearest2x(x)) sees only the low-res rows {i-1, i} (a=0) or
        {i, i+1} (a=1), the 3x3 taps that land on the same low-res pixel summed (and the same for
        columns). One conv with padding 1 computes all four phases on a (h+1) x (w+1) grid; phase
        (a, b) is its [a:a+h, b:b+w] window, interleaved into the 2h x 2w output.
        """
        batch, _, height, width = x.shape
        weight, bias = self._phase_weights()
        out_channels = self.conv.out_channels
        phases = nhwc(F.conv2d(x, weight, bias, padding=1))  # [B, h+1, w+1, 4 * C_out]
        out = x.new_empty(batch, height, 2, width, 2, out_channels)
        for a in (0, 1):
            for b in (0, 1):
                index = 2 * a + b
                out[:, :, a, :, b] = phases[:, a:a + height, b:b + width, index * out_channels:(index + 1) * out_channels]
        return out.view(batch, 2 * height, 2 * width, out_channels).permute(0, 3, 1, 2)

    def _phase_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[4 * C_out, C_in, 2, 2] folded weights (phase-major) and the bias repeated; cached until the
        conv's weights change (in-place updates and load_state_dict bump the tensor version)."""
        weight, bias = self.conv.weight, self.conv.bias
        key = (weight.data_ptr(), weight._version, bias.data_ptr(), bias._version, weight.dtype, weight.device)
        cached = getattr(self, "_phase_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        with torch.no_grad():
            w = weight.detach()
            # Rows: phase 0 taps low-res rows (i-1, i) with (w0, w1 + w2); phase 1 taps (i, i+1) with (w0 + w1, w2).
            rows = [torch.stack((w[:, :, 0], w[:, :, 1] + w[:, :, 2]), dim=2),
                    torch.stack((w[:, :, 0] + w[:, :, 1], w[:, :, 2]), dim=2)]  # each [O, I, 2, 3]
            phases = []
            for a in (0, 1):
                r = rows[a]
                cols = [torch.stack((r[..., 0], r[..., 1] + r[..., 2]), dim=3),
                        torch.stack((r[..., 0] + r[..., 1], r[..., 2]), dim=3)]  # each [O, I, 2, 2]
                phases.extend(cols)
            folded = torch.cat(phases, dim=0).contiguous(memory_format=torch.channels_last)
            folded_bias = bias.detach().repeat(4)
        self._phase_cache = (key, folded, folded_bias)
        return folded, folded_bias


class MiddleBlock(nn.Module):
    """res -> attention -> res at the lowest resolution (state-dict names block_1, attn_1, block_2)."""

    def __init__(self, channels: int, use_attention: bool, dropout: float, norm_groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm_groups)
        self.attn_1 = AttnBlock(channels, norm_groups) if use_attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))

    def inference_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_1.inference_forward(x)
        if isinstance(self.attn_1, AttnBlock):
            x = self.attn_1.inference_forward(x)
        return self.block_2.inference_forward(x)


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

    def inference_forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.block):
            x = block.inference_forward(x)
            if len(self.attn) > 0:
                x = self.attn[index].inference_forward(x)
        resample = getattr(self, self.resample_name, None)
        if resample is None:
            return x
        return resample.inference_forward(x) if isinstance(resample, Upsample) else resample(x)


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
        self.fast_inference = True  # use inference_forward when no gradient is recorded
        self._compiled_inference = None

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if self.fast_inference and not torch.is_grad_enabled():
            if self._compiled_inference is not None:
                return self._compiled_inference(latents)
            return self.inference_forward(latents)
        h = self.mid(self.conv_in(latents))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def inference_forward(self, latents: torch.Tensor) -> torch.Tensor:
        """forward, without autograd, on channels_last activations (see the module docstring).
        Returns a contiguous (NCHW) tensor like forward."""
        h = self.conv_in(latents.contiguous(memory_format=torch.channels_last))
        h = self.mid.inference_forward(h)
        for level in reversed(self.up):
            h = level.inference_forward(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True)).contiguous()

    def compile_inference(self, **compile_options) -> "Decoder":
        """Optional: run the inference path through torch.compile (off until this is called).

        The first call per input shape compiles (tens of seconds on a CPU); `torch.compile` options
        pass through (e.g. mode="max-autotune-no-cudagraphs"). Returns self.
        """
        self._compiled_inference = torch.compile(self.inference_forward, **compile_options)
        return self
