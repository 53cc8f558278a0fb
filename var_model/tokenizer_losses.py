"""The loss terms of the tokenizer's VQGAN-style recipe, as read from the official authors'
tokenizer code (FoundationVision/vaex `trainer.py`, `utils/loss.py`; the adaptive weight is VQGAN's,
CompVis/taming-transformers `taming/modules/losses/vqperceptual.py`).

Each function is one term. The caller owns the weights and does not call a term whose weight is 0,
so an off term costs nothing; `nll_loss` follows that rule for the reconstruction terms.

Legacy factors in vaex, for anyone matching its numbers: its trainer doubles the LPIPS weight
(`lp` 0.5 -> 1.0) and the bCR weight (`bcr` 4 -> 8); the adversarial weight `ld` 0.4 is used as is.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

DISCRIMINATOR_CRITERIA = ("hinge", "softplus", "linear")

# vaex `gada` 1: the local ratio, clamped to this range.
ADAPTIVE_WEIGHT_RANGE = (0.015, 1e4)


class WeightedLoss(NamedTuple):
    loss: torch.Tensor  # scalar: the weighted sum, carries the gradient
    terms: dict[str, torch.Tensor]  # each computed term unweighted and detached, for logging


def reconstruction_loss(
    images: torch.Tensor, reconstruction: torch.Tensor, l1_weight: float = 0.2, l2_weight: float = 1.0
) -> WeightedLoss:
    """`l1_weight * mean|rec - x| + l2_weight * mean (rec - x)^2`; a zero weight skips its term."""
    total = reconstruction.new_zeros(())
    terms: dict[str, torch.Tensor] = {}
    if l1_weight != 0:
        l1 = F.l1_loss(reconstruction, images)
        total = total + l1_weight * l1
        terms["l1"] = l1.detach()
    if l2_weight != 0:
        l2 = F.mse_loss(reconstruction, images)
        total = total + l2_weight * l2
        terms["l2"] = l2.detach()
    return WeightedLoss(total, terms)


def lpips_applies(image_size: int, min_resolution: int = 48, upsample_small_to: int | None = None) -> bool:
    """Whether the perceptual term is computed for images of this size.

    The recipe (vaex `lpr` 48) skips LPIPS below `min_resolution`. With `upsample_small_to` set,
    smaller images are upsampled to that size instead, so tiny (28-32 px) demo images can use it.
    """
    return image_size >= min_resolution or upsample_small_to is not None


def perceptual_loss(
    lpips: nn.Module, images: torch.Tensor, reconstruction: torch.Tensor,
    min_resolution: int = 48, upsample_small_to: int | None = None,
) -> torch.Tensor | None:
    """LPIPS(x, rec) averaged over the batch, or None where the resolution rule skips it.

    Images smaller than `min_resolution` are skipped (the recipe's default), or, with
    `upsample_small_to`, bilinearly upsampled to that size first: VGG's five poolings leave a
    28 px image a 1x1 map at relu5_3, too little for its deep layers to say anything.
    """
    size = min(images.shape[-2:])
    if not lpips_applies(size, min_resolution, upsample_small_to):
        return None
    if size < min_resolution and upsample_small_to is not None:
        target = (upsample_small_to, upsample_small_to)
        images = F.interpolate(images, size=target, mode="bilinear", align_corners=False)
        reconstruction = F.interpolate(reconstruction, size=target, mode="bilinear", align_corners=False)
    return lpips(images, reconstruction)


def nll_loss(
    images: torch.Tensor, reconstruction: torch.Tensor, *, l1_weight: float = 0.2, l2_weight: float = 1.0,
    lpips_weight: float = 0.0, lpips: nn.Module | None = None, lpips_min_resolution: int = 48,
    lpips_upsample_small_to: int | None = None,
) -> WeightedLoss:
    """The recipe's `L_nll = l1 * L1 + l2 * L2 + lpips_weight * LPIPS` (step 1 of vaex's trainer).

    `terms` holds 'l1', 'l2', 'lpips' for those computed. The LPIPS network is needed only when its
    weight is non-zero.
    """
    total, terms = reconstruction_loss(images, reconstruction, l1_weight, l2_weight)
    if lpips_weight != 0:
        if lpips is None:
            raise ValueError("lpips_weight is non-zero but no LPIPS network was given")
        perceptual = perceptual_loss(lpips, images, reconstruction, lpips_min_resolution, lpips_upsample_small_to)
        if perceptual is not None:
            total = total + lpips_weight * perceptual
            terms["lpips"] = perceptual.detach()
    return WeightedLoss(total, terms)


def discriminator_loss(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, criterion: str = "hinge"
) -> torch.Tensor:
    """The discriminator's loss on real and reconstructed images (vaex `dcrit`).

    hinge (the recipe's): `mean(relu(1 - D(x))) + mean(relu(1 + D(rec)))`;
    softplus: `mean(softplus(-D(x))) + mean(softplus(D(rec)))`; linear: `mean(-D(x)) + mean(D(rec))`.
    """
    if criterion == "hinge":
        return F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()
    if criterion == "softplus":
        return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()
    if criterion == "linear":
        return (-logits_real).mean() + logits_fake.mean()
    raise ValueError(f"criterion: expected one of {DISCRIMINATOR_CRITERIA}, got {criterion!r}")


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """`L_g = -mean(D(rec))`, whatever the discriminator's criterion (as in vaex and VQGAN)."""
    return -logits_fake.mean()


def adaptive_adversarial_weight(
    nll: torch.Tensor, generator_loss: torch.Tensor, last_layer_weight: torch.Tensor,
    weight_range: tuple[float, float] = ADAPTIVE_WEIGHT_RANGE,
) -> torch.Tensor:
    """VQGAN's adaptive weight `||dL_nll/dW|| / (||dL_g/dW|| + 1e-6)`, clamped to `weight_range`.

    `last_layer_weight` is the decoder's final convolution weight (`decoder.conv_out.weight`). Both
    gradients keep the graph (retain_graph) so the caller can still backpropagate the total loss.
    The result is detached: it scales L_g and is not itself trained.
    """
    nll_grad = torch.autograd.grad(nll, last_layer_weight, retain_graph=True)[0]
    generator_grad = torch.autograd.grad(generator_loss, last_layer_weight, retain_graph=True)[0]
    ratio = nll_grad.detach().norm() / (generator_grad.detach().norm() + 1e-6)
    return ratio.clamp(*weight_range)


def discriminator_schedule_factor(step: int, start_step: int, warmup_steps: int) -> float:
    """0 before `start_step`; then a linear ramp over `warmup_steps` steps; then 1.

    Step `start_step` already gets `1 / warmup_steps`, so the discriminator acts from its start step
    on (vaex's `min(1, (step - start) / warmup)` is 0 at the start step itself, one step later).
    """
    if step < start_step:
        return 0.0
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step - start_step + 1) / warmup_steps)


def consistency_loss(logits_strongly_augmented: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Balanced consistency regularisation (bCR, vaex `bcr`): MSE between the discriminator's logits
    on a strongly augmented copy of `[x; rec]` and on the plain (normally augmented) input.
    vaex keeps `logits` in the graph (both sides get the gradient); so does this."""
    return F.mse_loss(logits_strongly_augmented, logits)
