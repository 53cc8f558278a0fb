"""The VAR transformer (official models/var.py): class-conditioned next-scale prediction.

Sequence layout: the token pyramid of all scales, coarse to fine, L = sum(s*s) positions. Position 0..s0^2-1
holds the start token (class embedding + `pos_start`); the positions of scale k >= 1 hold
`word_embed` of the tokenizer's teacher-forcing input for scale k (the accumulated latent of scales
< k, area-downsampled to s_k x s_k). Every position adds its level embedding and its learned position.
Attention is block-causal: a token sees its own scale and all coarser ones. The logits at the
positions of scale k predict the tokens of scale k.

Two separate paths:
- `forward(labels, teacher_input)`: the whole (prefix of the) pyramid at once, masked; training.
- `first_scale_input` / `scale_input` / `forward_cached`: one scale at a time against a `KVCache`;
  generation (var_model.generation) drives them.

Deliberate difference from the official code: label dropout to the null class (cond_drop_rate) is
applied only in training mode. The official forward drops labels in eval mode too.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from var_model.kv_cache import KVCache
from var_model.transformer_blocks import AdaLNBeforeHead, AdaLNSelfAttention
from var_model.var_config import VARConfig


class VAR(nn.Module):
    def __init__(self, config: VARConfig) -> None:
        super().__init__()
        self.config = config
        width, scales = config.hidden_size, config.scales
        self.num_tokens = config.total_tokens
        self.first_tokens = scales[0] ** 2
        # [begin, end) of each scale in the flattened pyramid.
        ends = list(itertools.accumulate(s * s for s in scales))
        self.scale_bounds: list[tuple[int, int]] = [(end - s * s, end) for s, end in zip(scales, ends)]

        self.word_embed = nn.Linear(config.embed_dim, width)
        self.class_emb = nn.Embedding(config.num_classes + 1, width)  # last row: the null class
        self.pos_start = nn.Parameter(torch.empty(1, self.first_tokens, width))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.num_tokens, width))  # per-scale tables, concatenated
        self.lvl_embed = nn.Embedding(len(scales), width)

        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width)) if config.shared_adaln else None
        depth = config.num_layers
        drop_path_rates = [config.drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linspace(0, max)
        self.blocks = nn.ModuleList(
            AdaLNSelfAttention(
                width,
                config.num_heads,
                config.mlp_hidden_size,
                layer=i,
                shared_adaln=config.shared_adaln,
                l2_norm=config.attn_l2_norm,
                dropout=config.dropout,
                attn_dropout=config.attn_dropout,
                drop_path=drop_path_rates[i],
                norm_eps=config.norm_eps,
            )
            for i in range(depth)
        )

        levels = torch.cat([torch.full((s * s,), i) for i, s in enumerate(scales)])
        self.register_buffer("lvl_1L", levels.view(1, self.num_tokens))
        # Block-causal: query q may attend key k iff level(q) >= level(k).
        mask = torch.where(levels.view(-1, 1) >= levels.view(1, -1), 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", mask.view(1, 1, self.num_tokens, self.num_tokens))

        self.head_nm = AdaLNBeforeHead(width, config.norm_eps)
        self.head = nn.Linear(width, config.codebook_size)
        self.init_weights()

    # ----------------------------------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self) -> None:
        """The official init (VAR.init_weights with the training script's arguments)."""
        config = self.config
        std = config.init_std if config.init_std >= 0 else math.sqrt(1 / (3 * config.hidden_size))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.pos_1LC, std=std)
        self.head.weight.mul_(config.init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(config.init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        width, depth = config.hidden_size, config.num_layers
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            block.attn.q_bias.zero_()
            block.attn.v_bias.zero_()
            if config.attn_l2_norm:
                block.attn.scale_mul_1H11.fill_(math.log(4.0))
            if config.shared_adaln:
                block.ada_gss.normal_().div_(width**0.5)
                block.ada_gss[:, :, 2:].mul_(config.init_adaln)
                block.ada_gss[:, :, :2].mul_(config.init_adaln_gamma)
            else:
                # Rows [:2C] are the residual gates gamma1, gamma2: start them near zero.
                block.ada_lin[-1].weight[2 * width :].mul_(config.init_adaln)
                block.ada_lin[-1].weight[: 2 * width].mul_(config.init_adaln_gamma)
                block.ada_lin[-1].bias.zero_()

    # ------------------------------------------------------------------------------------- pieces
    def class_condition(self, labels: torch.Tensor) -> torch.Tensor:
        """Class embedding [B, C] (labels == num_classes is the null class). No dropout here."""
        return self.class_emb(labels)

    def _block_condition(self, condition: torch.Tensor) -> torch.Tensor:
        if self.shared_ada_lin is None:
            return condition
        return self.shared_ada_lin(condition).view(-1, 1, 6, self.config.hidden_size)

    def _level_positions(self, begin: int, end: int) -> torch.Tensor:
        return self.lvl_embed(self.lvl_1L[:, begin:end]) + self.pos_1LC[:, begin:end]

    def logits(self, hidden: torch.Tensor, condition: torch.Tensor,
               head_modulation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return self.head(self.head_nm(hidden, condition, head_modulation)).float()

    def prefix_end(self, teacher_tokens: int) -> int:
        """Pyramid length covered by `teacher_tokens` teacher-forcing positions; must end on a scale."""
        end = self.first_tokens + teacher_tokens
        if end not in {e for _, e in self.scale_bounds}:
            valid = [e - self.first_tokens for _, e in self.scale_bounds]
            raise ValueError(f"teacher_input: {teacher_tokens} tokens does not end on a scale boundary (one of {valid})")
        return end

    # ---------------------------------------------------------------------------------- training
    def forward(self, labels: torch.Tensor, teacher_input: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits.

        labels: int64 [B]; teacher_input: [B, L - s0^2, embed_dim] (tokenizer.teacher_forcing_input), or the
        inputs of a prefix of the scales. Returns float32 logits [B, L, V] (or [B, prefix, V]).
        Labels drop to the null class with probability cond_drop_rate, in training mode only.
        """
        batch = labels.shape[0]
        if teacher_input.ndim != 3 or teacher_input.shape[0] != batch or teacher_input.shape[2] != self.config.embed_dim:
            raise ValueError(
                f"teacher_input: expected [{batch}, tokens, {self.config.embed_dim}] (got {tuple(teacher_input.shape)})"
            )
        end = self.prefix_end(teacher_input.shape[1])
        if self.training and self.config.cond_drop_rate > 0:
            dropped = torch.rand(batch, device=labels.device) < self.config.cond_drop_rate
            labels = torch.where(dropped, self.config.num_classes, labels)
        condition = self.class_condition(labels)
        width = self.config.hidden_size
        start = condition.unsqueeze(1).expand(batch, self.first_tokens, width) + self.pos_start
        words = self.word_embed(teacher_input.to(self.word_embed.weight.dtype))
        x = torch.cat((start, words), dim=1) + self._level_positions(0, end)
        mask = self.attn_bias_for_masking[:, :, :end, :end].to(x.dtype)
        block_condition = self._block_condition(condition)
        for block in self.blocks:
            x = block(x, block_condition, mask)
        return self.logits(x, condition)

    # --------------------------------------------------------------------------------- inference
    def new_cache(self) -> KVCache:
        """An empty cache for one generation, its buffers sized for the whole pyramid."""
        return KVCache(self.config.num_layers, capacity=self.num_tokens)

    def first_scale_input(self, condition: torch.Tensor) -> torch.Tensor:
        """Input tokens of scale 0: start token + level/position, [B, s0^2, C]."""
        begin, end = self.scale_bounds[0]
        return condition.unsqueeze(1) + self.pos_start + self._level_positions(begin, end)

    def scale_input(self, latent_input: torch.Tensor, scale_index: int) -> torch.Tensor:
        """Input tokens of scale k >= 1 from the tokenizer's next-scale input [B, s_k^2, embed_dim]."""
        begin, end = self.scale_bounds[scale_index]
        return self.word_embed(latent_input.to(self.word_embed.weight.dtype)) + self._level_positions(begin, end)

    def forward_cached(self, tokens: torch.Tensor, condition: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, n, V] for the n newest tokens, which attend to themselves and to `cache` (extended
        in place). `condition` is the class embedding [B, C]. Feed one whole scale per call for VAR."""
        # The class condition is the same at every scale: its AdaLN projections are computed once per
        # sequence and kept in the cache (the official code recomputes them at every scale).
        block_condition = cache.memo("shared_adaln", condition, lambda: self._block_condition(condition))
        x = tokens
        for block in self.blocks:
            x = block.forward_cached(x, block_condition, cache)
        head_modulation = cache.memo("head", condition, lambda: self.head_nm.modulation(condition))
        return self.logits(x, condition, head_modulation)
