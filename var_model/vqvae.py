"""The multi-scale VQ tokenizer: CNN encoder -> residual multi-scale quantizer -> CNN decoder.

Official VAR `VQVAE`, with the same submodule names (encoder, decoder, quantize, quant_conv,
post_quant_conv) so the released checkpoint loads with strict key checking.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from var_model.autoencoder import Decoder, Encoder
from var_model.quantizer import MultiScaleQuantizer
from var_model.tokenizer_config import TokenizerConfig


class TokenizerOutput(NamedTuple):
    reconstruction: torch.Tensor  # [B, C, H, W], not clamped (training target is the [-1, 1] image)
    vq_loss: torch.Tensor  # scalar
    token_maps: list[torch.Tensor]  # one LongTensor [B, s, s] per scale
    code_usage: torch.Tensor  # scalar: fraction of the codebook this batch used
    perplexity: torch.Tensor  # scalar: exp(entropy) of this batch's code histogram


class VQVAE(nn.Module):
    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        trunk = dict(
            base_channels=config.base_channels, channel_multipliers=config.channel_multipliers,
            num_res_blocks=config.num_res_blocks, z_channels=config.embed_dim, use_attention=config.use_attention,
            dropout=config.dropout, norm_groups=config.norm_groups,
        )
        self.encoder = Encoder(in_channels=config.in_channels, **trunk)
        self.decoder = Decoder(out_channels=config.in_channels, **trunk)
        self.quantize = MultiScaleQuantizer(
            codebook_size=config.codebook_size, embed_dim=config.embed_dim, scales=config.scales,
            beta=config.beta, quant_resi=config.quant_resi, share_quant_resi=config.share_quant_resi,
            codebook_per_scale=config.codebook_per_scale,
        )
        self.quant_conv = nn.Conv2d(config.embed_dim, config.embed_dim, kernel_size=3, padding=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.embed_dim, kernel_size=3, padding=1)

    def _check_images(self, images: torch.Tensor) -> None:
        expected = (self.config.in_channels, self.config.image_size, self.config.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images: expected [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                             f"got {list(images.shape)}")

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] in [-1, 1] -> continuous latent [B, embed_dim, h, w] before quantization."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode_tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, C, H, W] in [-1, 1] -> one LongTensor [B, s, s] per scale, coarse to fine."""
        return self.quantize.latent_to_tokens(self.encode_latent(images))

    def decode_latent(self, accumulated_latent: torch.Tensor) -> torch.Tensor:
        """Accumulated quantized latent [B, embed_dim, h, w] -> images in [-1, 1] (official fhat_to_img)."""
        return self.decoder(self.post_quant_conv(accumulated_latent)).clamp(-1, 1)

    @torch.no_grad()
    def prepare_for_inference(self) -> "VQVAE":
        """Optional, for repeated decoding: keep the decoder's conv weights in channels_last memory, the
        layout its inference path computes in, so they are not reordered at every call. The values are
        unchanged (state_dict() tensors then have channels_last strides; `.contiguous()` restores the
        default layout). Returns self."""
        for module in (self.post_quant_conv, *self.decoder.modules()):
            if isinstance(module, nn.Conv2d):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
        return self

    def decode_tokens(self, token_maps: list[torch.Tensor]) -> torch.Tensor:
        """One token map per scale ([B, s, s] or [B, s*s]) -> images [B, C, H, W] in [-1, 1]."""
        return self.decode_latent(self.quantize.tokens_to_latent(token_maps))

    def teacher_forcing_input(self, token_maps: list[torch.Tensor]) -> torch.Tensor:
        """[B, total_tokens - scales[0]**2, embed_dim]: the transformer's inputs; see MultiScaleQuantizer."""
        return self.quantize.teacher_forcing_input(token_maps)

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        """Training pass: reconstruction through the straight-through quantizer, VQ loss, code statistics."""
        quantized = self.quantize(self.encode_latent(images))
        reconstruction = self.decoder(self.post_quant_conv(quantized.quantized))
        return TokenizerOutput(reconstruction, quantized.vq_loss, quantized.token_maps,
                               quantized.code_usage, quantized.perplexity)
