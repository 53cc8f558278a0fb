"""A frozen ViT-S/16 (DINO weights) that returns token features from chosen blocks: the backbone of
the recipe's discriminator (vaex `models/dino.py` FrozenDINOSmallNoDrop, itself timm's
`vit_small_patch16_224` without dropout).

Module names follow timm/DINO (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.norm1`,
`blocks.N.attn.qkv`, `blocks.N.attn.proj`, `blocks.N.mlp.fc1`, `norm`, ...), so their state dicts load
as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact GELU as in timm/DINO (vaex uses the tanh approximation)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, round(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, hw, C]


def resize_position_embedding(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + g*g, C] -> [1, 1 + grid*grid, C]: the class slot kept, the g x g grid bilinearly resized."""
    old_grid = math.isqrt(pos_embed.shape[1] - 1)
    if old_grid == grid:
        return pos_embed
    cls_slot, grid_part = pos_embed[:, :1], pos_embed[:, 1:]
    grid_part = grid_part.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
    grid_part = F.interpolate(grid_part, size=(grid, grid), mode="bilinear", align_corners=False)
    return torch.cat([cls_slot, grid_part.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


class FrozenViT(nn.Module):
    """ViT (default ViT-S/16: dim 384, 12 blocks, 6 heads) returning token features, never trained.

    `forward(images)` takes [B, 1 or 3, H, W] in [-1, 1], resizes to `input_size` (224 in the recipe;
    `pos_embed` is interpolated for other sizes) and returns one [B, C, L] map per tap: the patch
    embedding and each block in `tap_blocks`, each patch token plus the class token (vaex's readout).
    """

    def __init__(self, embed_dim: int = 384, depth: int = 12, num_heads: int = 6, patch_size: int = 16,
                 mlp_ratio: float = 4.0, pretrained_size: int = 224, input_size: int = 224,
                 tap_blocks: tuple[int, ...] = (2, 5, 8, 11)) -> None:
        super().__init__()
        if any(not 0 <= b < depth for b in tap_blocks):
            raise ValueError(f"tap_blocks: expected block indices in [0, {depth}), got {tap_blocks}")
        self.patch_size, self.input_size, self.tap_blocks = patch_size, input_size, tuple(sorted(tap_blocks))
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (pretrained_size // patch_size) ** 2 + 1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)  # in the weights' layout; features are taken before it
        # [-1, 1] -> ImageNet normalisation in one affine step: ((x + 1) / 2 - mean) / std.
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("input_scale", 0.5 / std, persistent=False)
        self.register_buffer("input_shift", (0.5 - mean) / std, persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenViT:
        return super().train(False)  # frozen: always eval

    @property
    def num_taps(self) -> int:
        return len(self.tap_blocks) + 1  # +1: the patch embedding, before any block

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        size = self.input_size
        if height == width == size:
            return images
        if height > size and width > size and torch.rand(()) < 0.5:  # vaex: a random crop half the time
            top = int(torch.randint(0, height - size + 1, ()))
            left = int(torch.randint(0, width - size + 1, ()))
            return images[..., top:top + size, left:left + size]
        mode = "area" if height > size else "bicubic"
        return F.interpolate(images, size=(size, size), mode=mode)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        images = self._resize(images.float() * self.input_scale + self.input_shift)
        tokens = self.patch_embed(images)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + resize_position_embedding(self.pos_embed, self.input_size // self.patch_size)

        def readout(x: torch.Tensor) -> torch.Tensor:
            return (x[:, 1:] + x[:, :1]).transpose(1, 2)  # patch tokens + class token, [B, C, L]

        features = [readout(tokens)]
        last_needed = max(self.tap_blocks, default=-1)  # blocks past the last tap are not run
        for index, block in enumerate(self.blocks[: last_needed + 1]):
            tokens = block(tokens)
            if index in self.tap_blocks:
                features.append(readout(tokens))
        return features
