"""Discriminators: VQGAN's PatchGAN shapes and init; the DINO-feature discriminator loading a ViT-S/16
state dict in timm/DINO layout that the test writes itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from var_model import DinoDiscriminator, PatchGANDiscriminator, build_dino_discriminator
from var_model.dino_vit import FrozenViT

VIT_S_KEYS = {
    "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
    "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
    "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "blocks.11.mlp.fc2.weight",
    "norm.weight", "norm.bias",
}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size, logits_side", [(28, 1), (32, 2), (64, 6)])
def test_patchgan_maps_images_to_a_one_channel_logit_map(channels, size, logits_side):
    discriminator = PatchGANDiscriminator(in_channels=channels)
    logits = discriminator(torch.randn(2, channels, size, size))
    assert logits.shape == (2, 1, logits_side, logits_side)


def test_patchgan_is_taming_nlayer_discriminator():
    torch.manual_seed(0)
    discriminator = PatchGANDiscriminator(in_channels=1)
    convs = [m for m in discriminator.main if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.bias is None for c in convs] == [False, True, True, True, False]
    assert all(c.kernel_size == (4, 4) for c in convs)
    norms = [m for m in discriminator.main if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 3 and all(n.bias.abs().sum() == 0 for n in norms)
    assert abs(norms[-1].weight.mean().item() - 1.0) < 0.01 and abs(convs[3].weight.std().item() - 0.02) < 0.002
    assert "main.11.weight" in discriminator.state_dict()  # taming's key layout


def write_vit_file(path, wrap: bool, **vit_shape):
    """A ViT state dict in timm/DINO layout with random values, as a DINO checkpoint may hold it."""
    torch.manual_seed(0)
    donor = FrozenViT(**vit_shape)
    state = {name: torch.randn_like(t) * 0.02 for name, t in donor.state_dict().items()}
    stored = dict(state, **{"head.weight": torch.zeros(3, 3)})  # a timm classifier, ignored
    if wrap:
        stored = {"teacher": {f"module.backbone.{k}": v for k, v in stored.items()}, "epoch": 100}
    torch.save(stored, path)
    return state


def test_vit_has_the_timm_dino_key_layout():
    keys = set(FrozenViT().state_dict())
    assert VIT_S_KEYS <= keys and len([k for k in keys if k.startswith("blocks.")]) == 12 * 12
    assert FrozenViT().state_dict()["pos_embed"].shape == (1, 197, 384)


@pytest.mark.parametrize("wrap", [False, True])
def test_dino_discriminator_loads_the_vit_and_trains_only_its_heads(tmp_path, wrap):
    path = tmp_path / "vit_small_patch16_224.pth"
    narrow = {"embed_dim": 48, "num_heads": 3}  # ViT-S's layout and depth at 1/8 of its width, for speed
    state = write_vit_file(path, wrap, **narrow)
    # Small inputs keep it fast too: a 32 px grid of 2x2 patches, pos_embed interpolated from 14x14.
    discriminator = build_dino_discriminator(path, input_size=32, **narrow)
    backbone = discriminator.backbone
    for name, tensor in state.items():
        assert torch.equal(backbone.state_dict()[name], tensor), name

    images = (torch.rand(2, 1, 28, 28) * 2 - 1).requires_grad_()  # grey, repeated to RGB
    logits = discriminator(images)
    assert logits.shape == (2, 5 * 4)  # 5 taps (patch embedding + blocks 2, 5, 8, 11) x 4 tokens
    logits.mean().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())
    trainable = dict(discriminator.named_parameters())
    assert trainable and all(name.startswith("heads.") for name in trainable)
    assert all(key.startswith("heads.") for key in discriminator.state_dict())


def test_dino_heads_are_stylegan_t_style():
    discriminator = DinoDiscriminator(FrozenViT(depth=3, tap_blocks=(2,), input_size=64, embed_dim=32, num_heads=2))
    head = discriminator.heads[0]
    residual_conv = head[1].body[0]
    assert residual_conv.kernel_size == (9,) and residual_conv.padding_mode == "circular"
    assert hasattr(residual_conv, "weight_orig")  # spectral norm
    assert isinstance(head[0][1], nn.BatchNorm1d) and isinstance(head[0][2], nn.LeakyReLU)
    assert head[0][2].negative_slope == 0.2
    assert discriminator(torch.randn(3, 3, 16, 16)).shape == (3, 2 * 16)  # resized to 64: 4x4 tokens
    with pytest.raises(ValueError, match="kernel_size"):
        DinoDiscriminator(FrozenViT(depth=1, tap_blocks=(0,), input_size=16, embed_dim=32, num_heads=2))


def test_a_missing_or_foreign_vit_file_is_named(tmp_path):
    missing = tmp_path / "dino_vits16.pth"
    with pytest.raises(FileNotFoundError) as error:
        build_dino_discriminator(missing)
    assert str(missing) in str(error.value) and "\n" not in str(error.value)
    foreign = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match="timm/DINO layout"):
        build_dino_discriminator(foreign, input_size=16)
