"""The VAR transformer's building blocks (official models/basic_var.py), with the official
parameter names so published state dicts load unchanged:

- `SelfAttention`: `mat_qkv` (no bias) + `q_bias`, `zero_k_bias` (buffer), `v_bias`; QK L2-norm with a
  learned per-head scale `scale_mul_1H11` (softmax scale 1), or the 0.25/sqrt(head_dim) scale without it.
- `FeedForward` (`fc1`, GELU-tanh, `fc2`).
- `AdaLNSelfAttention` (official AdaLNSelfAttn): `ada_lin` = SiLU + Linear(C, 6C) gives
  gamma1, gamma2, scale1, scale2, shift1, shift2; with shared AdaLN a per-block `ada_gss` offset instead.
- `AdaLNBeforeHead` (`ada_lin` = SiLU + Linear(C, 2C)): scale and shift before the output head.

Every attention-carrying module has two paths: `forward` (whole sequence, additive mask; training and
teacher forcing) and `forward_cached` (one scale's tokens against a `KVCache`; inference).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from var_model.kv_cache import KVCache


class DropPath(nn.Module):
    """Stochastic depth per sample (timm), active only in training."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class SelfAttention(nn.Module):
    def __init__(
        self, width: int, num_heads: int, *, l2_norm: bool, attn_dropout: float, proj_dropout: float, layer: int
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.layer = num_heads, width // num_heads, layer
        self.l2_norm = l2_norm
        if l2_norm:
            # Cosine attention: unit q and k, q scaled by a learned per-head factor, softmax scale 1.
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))  # keys carry no bias (a softmax no-op)
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(proj_dropout) if proj_dropout > 0 else nn.Identity()
        self.attn_dropout = attn_dropout

    def _queries_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, tokens, width = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, tokens, head_dim]
        if self.l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        return q, k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        dropout = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale)
        batch, _, tokens, _ = q.shape
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, -1)))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Whole sequence; `attn_mask` is additive (0 or -inf), [1, 1, L, L]."""
        q, k, v = self._queries_keys_values(x)
        return self._attend(q, k, v, attn_mask)

    def forward_cached(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The newest tokens attend to themselves and everything cached (no mask: all of it is coarser)."""
        q, k, v = self._queries_keys_values(x)
        k, v = cache.extend(self.layer, k, v)
        return self._attend(q, k, v, None)


class AdaLNSelfAttention(nn.Module):
    """Pre-norm block whose LayerNorm scale/shift and residual gates come from the class condition."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_hidden: int,
        *,
        layer: int,
        shared_adaln: bool,
        l2_norm: bool,
        dropout: float,
        attn_dropout: float,
        drop_path: float,
        norm_eps: float,
    ) -> None:
        super().__init__()
        self.width = width
        self.attn = SelfAttention(
            width, num_heads, l2_norm=l2_norm, attn_dropout=attn_dropout, proj_dropout=dropout, layer=layer
        )
        self.ffn = FeedForward(width, mlp_hidden, dropout)
        self.ln_wo_grad = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.shared_adaln = shared_adaln
        if shared_adaln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, width) / width**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def _modulations(self, condition: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # condition: the class embedding [B, C], or with shared AdaLN the shared projection [B, 1, 6, C].
        if self.shared_adaln:
            return (self.ada_gss + condition).unbind(2)
        return self.ada_lin(condition).view(-1, 1, 6, self.width).unbind(2)

    def _residual_updates(
        self, x: torch.Tensor, condition: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor],
        modulations: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        if modulations is None:
            modulations = self._modulations(condition)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = modulations
        x = x + self.drop_path(attend(self.ln_wo_grad(x) * (scale1 + 1) + shift1) * gamma1)
        x = x + self.drop_path(self.ffn(self.ln_wo_grad(x) * (scale2 + 1) + shift2) * gamma2)
        return x

    def forward(self, x: torch.Tensor, condition: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        return self._residual_updates(x, condition, lambda h: self.attn(h, attn_mask))

    def forward_cached(self, x: torch.Tensor, condition: torch.Tensor, cache: KVCache) -> torch.Tensor:
        # The modulations depend on the condition only: once per sequence, kept in the cache.
        modulations = cache.memo(("adaln", self.attn.layer), condition, lambda: self._modulations(condition))
        return self._residual_updates(x, condition, lambda h: self.attn.forward_cached(h, cache), modulations)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, width: int, norm_eps: float) -> None:
        super().__init__()
        self.width = width
        self.ln_wo_grad = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def modulation(self, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each [B, 1, C], from the class condition [B, C]."""
        scale, shift = self.ada_lin(condition).view(-1, 1, 2, self.width).unbind(2)
        return scale, shift

    def forward(self, x: torch.Tensor, condition: torch.Tensor,
                modulation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        scale, shift = self.modulation(condition) if modulation is None else modulation
        return self.ln_wo_grad(x) * (scale + 1) + shift
