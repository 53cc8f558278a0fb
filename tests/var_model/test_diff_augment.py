"""DiffAugment of the discriminator's inputs (vaex/StyleGAN-T diffaug): shapes, gradients, each operation."""

from __future__ import annotations

import torch

from var_model import DiffAugment
from var_model.diff_augment import cutout, gaussian_blur, translate


def test_keeps_shape_and_passes_gradients():
    torch.manual_seed(0)
    images = torch.rand(3, 1, 16, 16, requires_grad=True)
    augmented = DiffAugment(probability=1.0, cutout_ratio=0.25)(images, blur_strength=0.5)
    assert augmented.shape == images.shape
    augmented.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert torch.equal(DiffAugment(probability=0.0)(images), images.float())


def test_translation_shifts_with_zero_fill():
    torch.manual_seed(0)
    images = torch.arange(64.0).view(1, 1, 8, 8).repeat(4, 1, 1, 1) + 1  # no zeros inside
    assert torch.equal(translate(images, ratio=0.0), images)
    shifted = translate(images, ratio=0.25)
    for image, result in zip(images, shifted):
        kept = result[result != 0]
        assert set(kept.tolist()) <= set(image.flatten().tolist())
        assert (result == 0).sum() <= 64 - 36  # at most 2 rows and 2 columns uncovered


def test_cutout_zeros_one_square_at_most():
    torch.manual_seed(0)
    images = torch.ones(16, 1, 8, 8)
    masked = cutout(images, ratio=0.5)
    zeros = (masked == 0).flatten(1).sum(1)
    assert (zeros >= 4).all() and (zeros <= 16).all()


def test_blur_keeps_constant_images():
    flat = torch.full((1, 1, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat)
    assert torch.equal(gaussian_blur(flat, 0.0), flat)
