"""Tiny transformer + tokenizer pairs for the transformer tests (CPU, float32)."""

from __future__ import annotations

import torch

from var_model import VAR, VAR_PRESETS, VQVAE, TokenizerConfig, VARConfig


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Replace every parameter with N(0, std) noise: the official init keeps AdaLN gates near zero,
    which would hide bugs behind tiny differences."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return module


def tiny_pair(scales: tuple[int, ...] = (1, 2, 4), seed: int = 0, **var_fields) -> tuple[VAR, VQVAE]:
    """An eval-mode VAR and a matching VQVAE with random weights for the given schedule."""
    torch.manual_seed(seed)
    tokenizer_config = TokenizerConfig(
        image_size=scales[-1] * 4, in_channels=1, scales=scales, codebook_size=64, embed_dim=8, base_channels=16,
        channel_multipliers=(1, 2, 2), num_res_blocks=1, use_attention=False, norm_groups=8,
    )
    tokenizer = VQVAE(tokenizer_config).eval()
    with torch.no_grad():  # unit-scale codes, so that token changes move the transformer's inputs visibly
        tokenizer.quantize.embedding.weight.normal_(generator=torch.Generator().manual_seed(seed))
    fields = {**VAR_PRESETS["tiny"].to_dict(), "scales": scales, "codebook_size": 64, "embed_dim": 8, **var_fields}
    var = randomize_(VAR(VARConfig.from_dict(fields)), seed=seed).eval()
    return var, tokenizer


def random_token_maps(config: VARConfig, batch: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.codebook_size, (batch, s, s), generator=generator) for s in config.scales]
