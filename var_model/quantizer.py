"""Residual multi-scale vector quantization (official VAR `VectorQuantizer2`).

A latent [B, C, H, W] (H = W = scales[-1]) becomes one token map per scale, coarse to fine. For
scale k the still-unexplained residual is area-downsampled to s_k x s_k, each vector is replaced by
its nearest code (squared L2), the code map is bicubic-upsampled back to H x W, refined by a conv
Phi_k, added to the accumulated latent and subtracted from the residual. Decoding repeats the same
accumulation from the tokens alone, so the accumulated latent after the last scale is what the
decoder sees.

State-dict names follow the official checkpoint: `embedding.weight`, `quant_resi.qresi_ls.{i}.*`
(partially shared Phi), `ema_vocab_hit_SV`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Phi(nn.Conv2d):
    """Phi(h) = (1 - ratio) * h + ratio * conv3x3(h): the refinement applied to each upsampled code map."""

    def __init__(self, channels: int, ratio: float) -> None:
        super().__init__(channels, channels, kernel_size=3, padding=1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1.0 - self.ratio) + super().forward(h) * self.ratio


def phi_ticks(num_phi: int) -> np.ndarray:
    """Positions in [0, 1] of the shared Phi convs (official: 1/12 ... 11/12 for 4 convs)."""
    if num_phi == 4:
        return np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)
    return np.linspace(1 / 2 / num_phi, 1 - 1 / 2 / num_phi, num_phi)


def phi_index_for_scale(scale_index: int, num_scales: int, num_phi: int) -> int:
    """Which of `num_phi` convs scale k uses: the tick nearest k / (K - 1), computed in float64 like official."""
    position = scale_index / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(phi_ticks(num_phi) - position)))


def _make_phi(channels: int, ratio: float) -> nn.Module:
    return Phi(channels, ratio) if ratio > 1e-6 else nn.Identity()


class SharedPhi(nn.Module):
    """share_quant_resi = 1: one Phi for every scale (state-dict key `qresi`)."""

    def __init__(self, channels: int, ratio: float) -> None:
        super().__init__()
        self.qresi = _make_phi(channels, ratio)

    def for_scale(self, scale_index: int, num_scales: int) -> nn.Module:
        return self.qresi


class PartiallySharedPhi(nn.Module):
    """share_quant_resi = n > 1: n Phis, each scale takes the nearest one (state-dict key `qresi_ls`)."""

    def __init__(self, channels: int, ratio: float, count: int) -> None:
        super().__init__()
        self.qresi_ls = nn.ModuleList(_make_phi(channels, ratio) for _ in range(count))

    def for_scale(self, scale_index: int, num_scales: int) -> nn.Module:
        return self.qresi_ls[phi_index_for_scale(scale_index, num_scales, len(self.qresi_ls))]


class NonSharedPhi(nn.ModuleList):
    """share_quant_resi = 0: one Phi per scale (state-dict keys `{i}`)."""

    def __init__(self, channels: int, ratio: float, count: int) -> None:
        super().__init__(_make_phi(channels, ratio) for _ in range(count))

    def for_scale(self, scale_index: int, num_scales: int) -> nn.Module:
        return self[phi_index_for_scale(scale_index, num_scales, len(self))]


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # [B, C, H, W], straight-through: forward value = accumulated codes, gradient -> latent
    vq_loss: torch.Tensor  # scalar: mean over scales of beta * commitment + codebook MSE
    token_maps: list[torch.Tensor]  # one LongTensor [B, s, s] per scale
    code_usage: torch.Tensor  # scalar: fraction of codebook entries hit by this batch (all scales)
    perplexity: torch.Tensor  # scalar: exp(entropy) of this batch's code histogram (all scales)


class MultiScaleQuantizer(nn.Module):
    def __init__(self, *, codebook_size: int, embed_dim: int, scales: tuple[int, ...], beta: float = 0.25,
                 quant_resi: float = 0.5, share_quant_resi: int = 4, codebook_per_scale: bool = False) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.scales = tuple(scales)
        self.beta = beta
        self.codebook_per_scale = codebook_per_scale
        if share_quant_resi == 0:
            self.quant_resi = NonSharedPhi(embed_dim, quant_resi, len(self.scales))
        elif share_quant_resi == 1:
            self.quant_resi = SharedPhi(embed_dim, quant_resi)
        else:
            self.quant_resi = PartiallySharedPhi(embed_dim, quant_resi, share_quant_resi)
        if codebook_per_scale:
            self.codebooks = nn.ModuleList(nn.Embedding(codebook_size, embed_dim) for _ in self.scales)
        else:
            self.embedding = nn.Embedding(codebook_size, embed_dim)
        # Codes start near zero (taming VQGAN's uniform(-1/V, 1/V), official `eini < 0`): nn.Embedding's
        # N(0, 1) codes dwarf fresh encoder latents, so adding one would push the residual up.
        for index in range(len(self.scales) if codebook_per_scale else 1):
            nn.init.uniform_(self.codebook(index).weight, -1.0 / codebook_size, 1.0 / codebook_size)
        # EMA of how often each code is hit, per scale (official name); drives dead-code resets.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.scales), codebook_size))
        self.ema_updates = 0  # forward passes recorded into the EMA since construction

    # ----- small pieces -----------------------------------------------------------------------
    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def latent_size(self) -> int:
        return self.scales[-1]

    @property
    def compute_dtype(self) -> torch.dtype:
        """Quantization runs in the codebook's dtype (float32 unless the whole model was cast)."""
        return self.codebook(0).weight.dtype

    def codebook(self, scale_index: int) -> nn.Embedding:
        return self.codebooks[scale_index] if self.codebook_per_scale else self.embedding

    def refine(self, code_map: torch.Tensor, scale_index: int) -> torch.Tensor:
        """Apply scale k's Phi to a code map already at the latent grid size."""
        return self.quant_resi.for_scale(scale_index, self.num_scales)(code_map)

    def nearest_codes(self, vectors: torch.Tensor, scale_index: int) -> torch.Tensor:
        """[N, C] -> [N] indices of the nearest codes in squared L2 (same arithmetic as official)."""
        weight = self.codebook(scale_index).weight.detach()
        distances = vectors.square().sum(dim=1, keepdim=True) + weight.square().sum(dim=1)
        distances = torch.addmm(distances, vectors, weight.T, alpha=-2.0, beta=1.0)
        return distances.argmin(dim=1)

    def embed_tokens(self, token_map: torch.Tensor, scale_index: int) -> torch.Tensor:
        """Code vectors of one scale's tokens: [B, s, s] or [B, s*s] (row-major) -> [B, C, s, s]."""
        side = self.scales[scale_index]
        batch = token_map.shape[0]
        vectors = self.codebook(scale_index)(token_map.reshape(batch, side, side))
        return vectors.permute(0, 3, 1, 2).contiguous()

    def upsample_to_latent(self, code_map: torch.Tensor, scale_index: int) -> torch.Tensor:
        """Bicubic to the latent grid; the last scale is already there and is left untouched."""
        if scale_index == self.num_scales - 1:
            return code_map
        return F.interpolate(code_map, size=(self.latent_size, self.latent_size), mode="bicubic")

    def downsample_to_scale(self, latent: torch.Tensor, scale_index: int) -> torch.Tensor:
        """Area-average a latent-grid map down to scale k's side (identity for the last scale)."""
        if scale_index == self.num_scales - 1:
            return latent
        side = self.scales[scale_index]
        return F.interpolate(latent, size=(side, side), mode="area")

    def _check_latent(self, latent: torch.Tensor) -> None:
        if latent.ndim != 4 or latent.shape[1] != self.embed_dim or latent.shape[-2:] != (self.latent_size,) * 2:
            raise ValueError(f"latent: expected [B, {self.embed_dim}, {self.latent_size}, {self.latent_size}], "
                             f"got {list(latent.shape)}")

    # ----- latent -> tokens -------------------------------------------------------------------
    def _residual_quantize(self, latent: torch.Tensor):
        """Yield (scale_index, token_map [B,s,s], refined code map [B,C,H,W]) coarse to fine.

        Selection runs on a detached residual (tokens carry no gradient); the code maps keep the
        graph to the codebook and Phi so the training loss can update them.
        """
        self._check_latent(latent)
        residual = latent.detach().to(self.compute_dtype).clone()
        batch, channels = latent.shape[:2]
        for scale_index, side in enumerate(self.scales):
            pooled = self.downsample_to_scale(residual, scale_index)
            vectors = pooled.permute(0, 2, 3, 1).reshape(-1, channels)
            token_map = self.nearest_codes(vectors, scale_index).view(batch, side, side)
            code_map = self.refine(self.upsample_to_latent(self.embed_tokens(token_map, scale_index), scale_index),
                                   scale_index)
            residual = residual - code_map.detach()
            yield scale_index, token_map, code_map

    @torch.no_grad()
    def latent_to_tokens(self, latent: torch.Tensor) -> list[torch.Tensor]:
        """[B, C, H, W] -> one LongTensor [B, s, s] per scale (official f_to_idxBl_or_fhat, tokens)."""
        return [token_map for _, token_map, _ in self._residual_quantize(latent)]

    @torch.no_grad()
    def latent_to_partial_reconstructions(self, latent: torch.Tensor) -> list[torch.Tensor]:
        """The accumulated latent after each scale, coarse to fine (official f_to_idxBl_or_fhat, to_fhat)."""
        accumulated = torch.zeros_like(latent, dtype=self.compute_dtype)
        partials = []
        for _, _, code_map in self._residual_quantize(latent):
            accumulated = accumulated + code_map
            partials.append(accumulated)
        return partials

    # ----- training forward -------------------------------------------------------------------
    def forward(self, latent: torch.Tensor) -> QuantizerOutput:
        """Training pass: quantize with the VQ loss, straight-through output and code statistics."""
        # Official runs this with autocast off: distances and losses stay in the codebook's precision.
        with torch.autocast(device_type=latent.device.type, enabled=False):
            return self._training_forward(latent.to(self.compute_dtype))

    def _training_forward(self, latent: torch.Tensor) -> QuantizerOutput:
        target = latent.detach()
        accumulated = torch.zeros_like(target)
        vq_loss = latent.new_zeros(())
        token_maps = []
        hits_per_scale = []
        for scale_index, token_map, code_map in self._residual_quantize(latent):
            accumulated = accumulated + code_map
            # beta * commitment (moves the encoder) + codebook term (moves codes and Phi).
            vq_loss = vq_loss + self.beta * F.mse_loss(accumulated.detach(), latent) + F.mse_loss(accumulated, target)
            token_maps.append(token_map)
            hits_per_scale.append(torch.bincount(token_map.flatten(), minlength=self.codebook_size).float())
        vq_loss = vq_loss / self.num_scales
        hits = torch.stack(hits_per_scale)  # [K, V]
        if self.training:
            self._record_hits(hits)
        # Straight-through: the value of the codes, the gradient of the identity to the latent.
        quantized = (accumulated.detach() - target) + latent
        totals = hits.sum(dim=0)
        probabilities = totals / totals.sum()
        entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum()
        return QuantizerOutput(quantized, vq_loss, token_maps, (totals > 0).float().mean(), entropy.exp())

    @torch.no_grad()
    def _record_hits(self, hits: torch.Tensor) -> None:
        # Under data parallelism every rank must see the same counts (official all-reduces too).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            hits = hits.clone()
            torch.distributed.all_reduce(hits)
        # Official schedule: copy first, then momentum 0.9 for the first 100 records, then 0.99.
        # (Official counts one record per scale; we count one per forward pass.)
        if self.ema_updates == 0:
            self.ema_vocab_hit_SV.copy_(hits)
        else:
            momentum = 0.9 if self.ema_updates < 100 else 0.99
            self.ema_vocab_hit_SV.mul_(momentum).add_(hits * (1 - momentum))
        self.ema_updates += 1

    def ema_code_usage(self, tokens_per_batch: int) -> torch.Tensor:
        """Per-scale fraction of codes whose EMA hit count reaches the official margin.

        Official margin: 8% of a uniform share, (tokens per batch at the latent grid) / V * 0.08.
        """
        margin = tokens_per_batch / self.codebook_size * 0.08
        return (self.ema_vocab_hit_SV >= margin).float().mean(dim=1)

    @torch.no_grad()
    def reset_dead_codes(self, latents_sample: torch.Tensor, threshold: float,
                         generator: torch.Generator | None = None) -> int:
        """Replace codes whose EMA hit count is below `threshold` with random encoder output vectors.

        `latents_sample`: [N, C, H, W] (or [N, C]) encoder latents. With a shared codebook a code is
        dead when its hits summed over scales fall below the threshold; with per-scale codebooks each
        scale is judged alone. Reset codes get the mean EMA count of their row, so they are not reset
        again before they had a chance to be used. Returns how many codes were replaced.
        """
        vectors = latents_sample.detach().to(self.compute_dtype)
        if vectors.ndim == 4:
            vectors = vectors.permute(0, 2, 3, 1).reshape(-1, vectors.shape[1])
        if vectors.ndim != 2 or vectors.shape[1] != self.embed_dim or vectors.shape[0] == 0:
            raise ValueError(f"latents_sample: expected [N, {self.embed_dim}, H, W] or [N, {self.embed_dim}], "
                             f"got {list(latents_sample.shape)}")
        vectors = vectors.to(self.ema_vocab_hit_SV.device)
        rows = range(self.num_scales) if self.codebook_per_scale else [None]
        replaced = 0
        for scale_index in rows:
            usage = self.ema_vocab_hit_SV.sum(dim=0) if scale_index is None else self.ema_vocab_hit_SV[scale_index]
            dead = (usage < threshold).nonzero().flatten()
            if dead.numel() == 0:
                continue
            picks = torch.randint(0, vectors.shape[0], (dead.numel(),), generator=generator,
                                  device=generator.device if generator is not None else vectors.device)
            weight = self.codebook(scale_index or 0).weight
            weight[dead] = vectors[picks.to(vectors.device)].to(weight.dtype)
            if scale_index is None:
                self.ema_vocab_hit_SV[:, dead] = self.ema_vocab_hit_SV.mean(dim=1, keepdim=True)
            else:
                self.ema_vocab_hit_SV[scale_index, dead] = self.ema_vocab_hit_SV[scale_index].mean()
            replaced += dead.numel()
        return replaced

    # ----- tokens -> latent, and the transformer's inputs -------------------------------------
    def tokens_to_latent(self, token_maps: list[torch.Tensor]) -> torch.Tensor:
        """Accumulated latent [B, C, H, W] from all scales' tokens (official embed_to_fhat, last one)."""
        if len(token_maps) != self.num_scales:
            raise ValueError(f"token_maps: expected {self.num_scales} scales {self.scales}, got {len(token_maps)}")
        accumulated = None
        for scale_index, token_map in enumerate(token_maps):
            code_map = self.refine(self.upsample_to_latent(self.embed_tokens(token_map, scale_index), scale_index),
                                   scale_index)
            accumulated = code_map if accumulated is None else accumulated + code_map
        return accumulated

    def teacher_forcing_input(self, token_maps: list[torch.Tensor]) -> torch.Tensor:
        """The transformer's inputs for scales 1..K-1 from the ground-truth tokens (official idxBl_to_var_input).

        After scale k (k < K-1) the accumulated latent is area-downsampled to scale k+1's side and
        flattened row-major: [B, total_tokens - scales[0]**2, C] (float32 unless the model was cast). Scale 0 has no such input
        (the transformer starts from the class token).
        """
        batch = token_maps[0].shape[0]
        accumulated = torch.zeros(batch, self.embed_dim, self.latent_size, self.latent_size,
                                  device=token_maps[0].device, dtype=self.compute_dtype)
        inputs = []
        for scale_index in range(self.num_scales - 1):
            code_map = self.upsample_to_latent(self.embed_tokens(token_maps[scale_index], scale_index), scale_index)
            accumulated = accumulated + self.refine(code_map, scale_index)
            next_side = self.scales[scale_index + 1]
            inputs.append(self._flatten(F.interpolate(accumulated, size=(next_side, next_side), mode="area")))
        if not inputs:
            return torch.zeros(batch, 0, self.embed_dim, device=token_maps[0].device, dtype=self.compute_dtype)
        return torch.cat(inputs, dim=1)

    def next_autoregressive_input(self, scale_index: int, accumulated_latent: torch.Tensor,
                                  code_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One generation step (official get_next_autoregressive_input).

        `code_embeddings`: [B, C, s_k, s_k], the sampled tokens of scale k through `embed_tokens`
        (or a soft mixture of codes). Returns the new accumulated latent [B, C, H, W] (a new tensor;
        the argument is not modified) and the next scale's transformer input [B, s_{k+1}**2, C]
        flattened row-major like `teacher_forcing_input`, or None after the last scale.
        """
        code_map = self.refine(self.upsample_to_latent(code_embeddings, scale_index), scale_index)
        accumulated_latent = accumulated_latent + code_map
        if scale_index == self.num_scales - 1:
            return accumulated_latent, None
        next_side = self.scales[scale_index + 1]
        return accumulated_latent, self._flatten(F.interpolate(accumulated_latent, size=(next_side, next_side),
                                                               mode="area"))

    @staticmethod
    def _flatten(latent_map: torch.Tensor) -> torch.Tensor:
        """[B, C, s, s] -> [B, s*s, C] (row-major positions)."""
        return latent_map.flatten(2).transpose(1, 2)
