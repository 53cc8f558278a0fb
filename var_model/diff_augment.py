"""Differentiable augmentation of the discriminator's inputs (DiffAugment, Zhao et al. 2020), as the
recipe uses it: vaex `utils/diffaug.py`, taken from StyleGAN-T `training/diffaug.py`.

Translation (up to 1/8 of the size, zero fill), colour (brightness, saturation, contrast) and
cutout, each drawn for the whole batch with probability `probability`, their amounts per image.
Optionally a Gaussian blur first, which vaex fades out while the discriminator warms up. Gradients
flow through every operation, so the generator's adversarial loss may use it too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_blur(images: torch.Tensor, strength: float) -> torch.Tensor:
    """vaex's warm-up blur: sigma = strength * sqrt(H / 2), a 3-sigma separable kernel, reflect padding."""
    sigma = strength * math.sqrt(images.shape[-2] * 0.5)
    radius = math.floor(3 * sigma)
    if radius < 1:
        return images
    channels = images.shape[1]
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp2(-(offsets / sigma).square())
    kernel = kernel / kernel.sum()
    padded = F.pad(images, [radius] * 4, mode="reflect")
    blurred = F.conv2d(padded, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(blurred, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)


def translate(images: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by a random integer offset up to `ratio` of its size; uncovered pixels are 0."""
    batch, _, height, width = images.shape
    max_dy, max_dx = round(height * ratio), round(width * ratio)
    dy = torch.randint(-max_dy, max_dy + 1, (batch, 1, 1), device=images.device)
    dx = torch.randint(-max_dx, max_dx + 1, (batch, 1, 1), device=images.device)
    rows = torch.arange(height, device=images.device).view(1, -1, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, -1)
    # Index a one-pixel zero border: positions pushed outside land on it.
    source_rows = (rows + dy + 1).clamp(0, height + 1).expand(batch, height, width)
    source_cols = (cols + dx + 1).clamp(0, width + 1).expand(batch, height, width)
    padded = F.pad(images, [1, 1, 1, 1]).permute(0, 2, 3, 1)  # [B, H+2, W+2, C]
    batch_index = torch.arange(batch, device=images.device).view(-1, 1, 1).expand(batch, height, width)
    return padded[batch_index, source_rows, source_cols].permute(0, 3, 1, 2)


def adjust_colour(images: torch.Tensor) -> torch.Tensor:
    """Random brightness (+-0.5), saturation (x0..2) and contrast (x0.5..1.5) per image."""
    batch = images.shape[0]
    amounts = torch.rand(3, batch, 1, 1, 1, dtype=images.dtype, device=images.device)
    images = images + (amounts[0] - 0.5)
    channel_mean = images.mean(dim=1, keepdim=True)
    images = (images - channel_mean) * (amounts[1] * 2) + channel_mean
    image_mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - image_mean) * (amounts[2] + 0.5) + image_mean


def cutout(images: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero one random square of `ratio` of the size per image (its centre may sit on the border)."""
    batch, _, height, width = images.shape
    cut_h, cut_w = round(height * ratio), round(width * ratio)
    centre_y = torch.randint(0, height + (1 - cut_h % 2), (batch, 1, 1), device=images.device)
    centre_x = torch.randint(0, width + (1 - cut_w % 2), (batch, 1, 1), device=images.device)
    rows = torch.arange(height, device=images.device).view(1, -1, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, -1)
    top, left = centre_y - cut_h // 2, centre_x - cut_w // 2
    inside = (rows >= top) & (rows < top + cut_h) & (cols >= left) & (cols < left + cut_w)
    return images * (~inside).unsqueeze(1).to(images.dtype)


class DiffAugment:
    """`augment(images, blur_strength=0.0)`; probability 1.0 and cutout 0.2 are the recipe's
    (vaex `disc_aug_prob`; its bCR copy uses probability 1 and cutout `bcr_cut` 0.2)."""

    def __init__(self, probability: float = 1.0, cutout_ratio: float = 0.2) -> None:
        self.probability = probability
        self.cutout_ratio = cutout_ratio

    def __call__(self, images: torch.Tensor, blur_strength: float = 0.0) -> torch.Tensor:
        images = images.float()
        if blur_strength > 0:
            images = gaussian_blur(images, blur_strength)
        if self.probability <= 0:
            return images
        use_translation, use_colour, use_cutout = (torch.rand(3) <= self.probability).tolist()
        if use_translation:
            images = translate(images)
        if use_colour:
            images = adjust_colour(images)
        if use_cutout and self.cutout_ratio > 0:
            images = cutout(images, self.cutout_ratio)
        return images
