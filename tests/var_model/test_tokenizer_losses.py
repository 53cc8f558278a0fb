"""The tokenizer recipe's loss terms against their formulas (vaex trainer.py, VQGAN's adaptive weight)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from var_model import (
    adaptive_adversarial_weight,
    consistency_loss,
    discriminator_loss,
    discriminator_schedule_factor,
    generator_adversarial_loss,
    lpips_applies,
    nll_loss,
    perceptual_loss,
    reconstruction_loss,
)


def images_and_reconstruction(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 1, 8, 8, generator=generator) * 2 - 1
    return images, (images + 0.3 * torch.randn(2, 1, 8, 8, generator=generator)).requires_grad_()


def test_reconstruction_loss_is_weighted_l1_plus_l2():
    images, rec = images_and_reconstruction()
    loss, terms = reconstruction_loss(images, rec, l1_weight=0.2, l2_weight=1.0)
    l1, l2 = (rec - images).abs().mean(), (rec - images).square().mean()
    assert torch.allclose(loss, 0.2 * l1 + 1.0 * l2)
    assert torch.allclose(terms["l1"], l1) and torch.allclose(terms["l2"], l2)
    assert loss.requires_grad and not terms["l1"].requires_grad


def test_a_zero_weight_term_is_not_computed():
    images, rec = images_and_reconstruction()
    loss, terms = reconstruction_loss(images, rec, l1_weight=0.0, l2_weight=1.0)
    assert set(terms) == {"l2"}
    assert torch.allclose(loss, (rec - images).square().mean())

    class MustNotRun(nn.Module):
        def forward(self, *args):
            raise AssertionError("LPIPS ran with weight 0")

    _, terms = nll_loss(images, rec, l1_weight=0.2, l2_weight=1.0, lpips_weight=0.0, lpips=MustNotRun())
    assert "lpips" not in terms


class MeanAbsDistance(nn.Module):
    """A stand-in perceptual network that records the size it was called at."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def forward(self, images, reconstruction):
        self.sizes.append(images.shape[-1])
        return (images - reconstruction).abs().mean()


def test_nll_adds_weighted_lpips_above_the_resolution_threshold():
    images, rec = images_and_reconstruction()
    perceptual = MeanAbsDistance()
    loss, terms = nll_loss(images, rec, l1_weight=0.2, l2_weight=1.0, lpips_weight=0.5, lpips=perceptual,
                           lpips_min_resolution=8)
    expected = 0.2 * (rec - images).abs().mean() + (rec - images).square().mean() + 0.5 * (rec - images).abs().mean()
    assert torch.allclose(loss, expected)
    assert set(terms) == {"l1", "l2", "lpips"} and perceptual.sizes == [8]


def test_lpips_skips_or_upsamples_small_images():
    images, rec = images_and_reconstruction()  # 8 px
    perceptual = MeanAbsDistance()
    assert not lpips_applies(8, min_resolution=48) and lpips_applies(48, min_resolution=48)
    assert perceptual_loss(perceptual, images, rec, min_resolution=48) is None
    assert perceptual.sizes == []
    assert perceptual_loss(perceptual, images, rec, min_resolution=48, upsample_small_to=64) is not None
    assert perceptual.sizes == [64]
    _, terms = nll_loss(images, rec, lpips_weight=0.5, lpips=perceptual)  # recipe default: skip below 48
    assert "lpips" not in terms
    with pytest.raises(ValueError, match="LPIPS"):
        nll_loss(images, rec, lpips_weight=0.5)


def test_discriminator_losses_match_their_formulas():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.3, 1.5])
    hinge = (torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean())
    assert torch.allclose(discriminator_loss(real, fake), hinge)
    assert torch.allclose(discriminator_loss(real, fake, "hinge"), torch.tensor((0 + 0.5 + 2) / 3 + (0 + 1.3 + 2.5) / 3))
    softplus = torch.log1p(torch.exp(-real)).mean() + torch.log1p(torch.exp(fake)).mean()
    assert torch.allclose(discriminator_loss(real, fake, "softplus"), softplus)
    assert torch.allclose(discriminator_loss(real, fake, "linear"), -real.mean() + fake.mean())
    with pytest.raises(ValueError, match="criterion"):
        discriminator_loss(real, fake, "wasserstein")
    assert torch.allclose(generator_adversarial_loss(fake), -fake.mean())


def test_adaptive_weight_is_the_clamped_gradient_norm_ratio():
    torch.manual_seed(0)
    last_layer = nn.Conv2d(4, 1, kernel_size=3, padding=1)
    features = torch.randn(2, 4, 6, 6)
    images = torch.randn(2, 1, 6, 6)
    rec = last_layer(features)
    nll = F.mse_loss(rec, images)
    generator_loss = -(0.1 * rec).mean()
    weight = adaptive_adversarial_weight(nll, generator_loss, last_layer.weight)

    # By hand: d mse / d rec = 2 (rec - x) / N; d L_g / d rec = -0.1 / N; each pulled back through the conv.
    count = rec.numel()
    grad_nll = torch.nn.grad.conv2d_weight(features, last_layer.weight.shape, 2 * (rec - images).detach() / count, padding=1)
    grad_g = torch.nn.grad.conv2d_weight(features, last_layer.weight.shape, torch.full_like(rec, -0.1 / count), padding=1)
    expected = grad_nll.norm() / (grad_g.norm() + 1e-6)
    assert 0.015 < expected < 1e4
    assert torch.allclose(weight, expected, rtol=1e-5)
    assert not weight.requires_grad
    (nll + weight * generator_loss).backward()  # the graph was retained for the real backward

    rec = last_layer(features)
    tiny = adaptive_adversarial_weight(1e-12 * rec.mean(), rec.mean(), last_layer.weight)
    huge = adaptive_adversarial_weight(rec.mean(), 1e-12 * rec.mean(), last_layer.weight)
    assert tiny.item() == pytest.approx(0.015) and huge.item() == pytest.approx(1e4)


def test_discriminator_starts_at_its_step_and_not_before():
    factors = [discriminator_schedule_factor(step, start_step=10, warmup_steps=4) for step in range(16)]
    assert factors[:10] == [0.0] * 10
    assert factors[10:] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert discriminator_schedule_factor(9, 10, 0) == 0.0 and discriminator_schedule_factor(10, 10, 0) == 1.0


def test_consistency_loss_is_mse_between_logits():
    augmented, plain = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.5, 2.0, 1.0])
    assert torch.allclose(consistency_loss(augmented, plain), torch.tensor((0.25 + 0 + 4) / 3))
