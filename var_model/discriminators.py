"""The tokenizer's discriminators: each maps images in [-1, 1] to real/fake logits.

- `PatchGANDiscriminator`: VQGAN's N-layer convolutional discriminator (CompVis/taming-transformers
  `taming/modules/discriminator/model.py` NLayerDiscriminator, after pix2pix), trained from scratch.
  It needs no weights, so it is the default and what small data uses.
- `DinoDiscriminator`: the official recipe's (vaex `models/dino.py` DinoDisc): a frozen DINO
  ViT-S/16 whose token features from several blocks feed small trainable StyleGAN-T-style heads.
  Build it with `build_dino_discriminator(weights_path)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import spectral_norm

from var_model.dino_vit import FrozenViT, resize_position_embedding


def taming_weights_init(module: nn.Module) -> None:
    """taming's `weights_init`: conv weights N(0, 0.02); batch-norm scales N(1, 0.02), shifts 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchGANDiscriminator(nn.Module):
    """VQGAN's NLayerDiscriminator: [B, C, H, W] -> a 1-channel logit map [B, 1, h, w].

    Kernel 4; `num_layers` stride-2 convs (widths 64, 128, 256 for 3 layers, capped at 8x), one
    stride-1 conv, then a 1-channel conv; BatchNorm and LeakyReLU 0.2 between. The module names
    (`main.N`) are taming's, so its checkpoints load. Each logit sees a patch (70 px for 3 layers);
    a 28-32 px image gets a 1x1 or 2x2 map.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2, True),
        ]
        width = base_channels
        for layer in range(1, num_layers + 1):
            out_width = base_channels * min(2 ** layer, 8)
            stride = 2 if layer < num_layers else 1
            # No conv bias before a BatchNorm (taming's use_bias = False for BatchNorm2d).
            layers += [nn.Conv2d(width, out_width, kernel_size=4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(out_width), nn.LeakyReLU(0.2, True)]
            width = out_width
        layers.append(nn.Conv2d(width, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(taming_weights_init)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


class ScaledResidual(nn.Module):
    """`(f(x) + x) / sqrt(2)`, StyleGAN-T's residual, keeping the activation scale."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.body(x) + x) / math.sqrt(2)


def _head_block(channels: int, kernel_size: int) -> nn.Sequential:
    """Spectral-normed Conv1d over the token sequence (circular padding) -> BatchNorm -> LeakyReLU 0.2."""
    conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return nn.Sequential(spectral_norm(conv), nn.BatchNorm1d(channels, eps=1e-6), nn.LeakyReLU(0.2, True))


def feature_head(channels: int, kernel_size: int = 9) -> nn.Sequential:
    """One StyleGAN-T-style head: [B, C, L] tokens -> [B, 1, L] logits (kernel 9 is StyleGAN-T's)."""
    return nn.Sequential(
        _head_block(channels, 1),
        ScaledResidual(_head_block(channels, kernel_size)),
        spectral_norm(nn.Conv1d(channels, 1, kernel_size=1)),
    )


class DinoDiscriminator(nn.Module):
    """Frozen ViT features -> one trainable head per tap -> logits [B, taps * L], concatenated.

    The ViT is held outside the module's parameters and state dict (as vaex does): the optimizer,
    DDP/DeepSpeed and checkpoints see only the heads, and the backbone comes from its weights file.
    It follows the inputs' device at each call. Batch norms are plain BatchNorm1d; convert them with
    `nn.SyncBatchNorm.convert_sync_batchnorm` for the recipe's synchronised ones.
    """

    def __init__(self, backbone: FrozenViT, kernel_size: int = 9) -> None:
        super().__init__()
        tokens = (backbone.input_size // backbone.patch_size) ** 2
        if tokens < kernel_size // 2:  # circular padding may wrap around the token sequence once at most
            raise ValueError(f"kernel_size {kernel_size} needs at least {kernel_size // 2} tokens; "
                             f"input_size {backbone.input_size} gives {tokens}")
        self._backbone = (backbone,)  # a tuple hides it from parameters(), state_dict() and .to()
        self.heads = nn.ModuleList(feature_head(backbone.embed_dim, kernel_size) for _ in range(backbone.num_taps))

    @property
    def backbone(self) -> FrozenViT:
        return self._backbone[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        backbone = self.backbone.to(images.device)
        features = backbone(images)
        return torch.cat([head(f).flatten(1) for head, f in zip(self.heads, features)], dim=1)


def _unwrap_state_dict(state: Mapping) -> dict[str, torch.Tensor]:
    """A ViT state dict from a checkpoint that may wrap it (DINO's 'teacher', 'model', 'state_dict')
    and prefix its keys ('module.', 'backbone.')."""
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    unwrapped = {}
    for name, tensor in state.items():
        for prefix in ("module.", "backbone."):
            name = name.removeprefix(prefix)
        unwrapped[name] = tensor
    return unwrapped


def load_vit_weights(backbone: FrozenViT, weights_path: str | Path) -> None:
    """Load a timm/DINO ViT state dict into `backbone`; a classifier `head.*` is ignored, and a
    `pos_embed` for another grid is resized. Raises FileNotFoundError naming a missing file."""
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"DINO ViT-S/16 weights file not found: {path}")
    state = _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    state = {name: t for name, t in state.items() if not name.startswith("head.")}
    if "pos_embed" in state:
        grid = math.isqrt(backbone.pos_embed.shape[1] - 1)
        state["pos_embed"] = resize_position_embedding(state["pos_embed"], grid)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: not a ViT-S/16 state dict in timm/DINO layout "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def build_dino_discriminator(
    weights_path: str | Path, input_size: int = 224, tap_blocks: tuple[int, ...] = (2, 5, 8, 11),
    kernel_size: int = 9, **vit_shape: int,
) -> DinoDiscriminator:
    """The recipe's discriminator from a DINO ViT-S/16 weights file (vaex `dino_path`).

    tap_blocks: the blocks whose features get a head (vaex's default; the patch embedding always
    does). input_size: the size images are resized to (224 as pretrained). vit_shape: embed_dim,
    depth, num_heads, patch_size, to build a smaller ViT in tests.
    """
    backbone = FrozenViT(input_size=input_size, tap_blocks=tap_blocks, **vit_shape)
    load_vit_weights(backbone, weights_path)
    return DinoDiscriminator(backbone, kernel_size=kernel_size)
