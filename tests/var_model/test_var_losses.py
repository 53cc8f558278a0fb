"""next_scale_loss: the official mean cross-entropy over all tokens, with per-scale statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from var_model import next_scale_loss

SCALES = (1, 2, 3)


def token_maps(batch: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, s, s), generator=generator) for s in SCALES]


def test_loss_is_mean_cross_entropy_over_every_token():
    maps = token_maps(batch=4, vocab=16)
    logits = torch.randn(4, 14, 16, requires_grad=True)
    loss, per_scale_loss, per_scale_accuracy = next_scale_loss(logits, maps)
    targets = torch.cat([m.flatten(1) for m in maps], dim=1)
    expected = F.cross_entropy(logits.reshape(-1, 16), targets.reshape(-1))
    assert torch.allclose(loss, expected)
    token_loss = F.cross_entropy(logits.reshape(-1, 16), targets.reshape(-1), reduction="none").view(4, 14)
    assert torch.allclose(per_scale_loss, torch.stack([token_loss[:, :1].mean(), token_loss[:, 1:5].mean(),
                                                       token_loss[:, 5:].mean()]))
    assert per_scale_loss.shape == per_scale_accuracy.shape == (3,)
    assert not per_scale_loss.requires_grad
    loss.backward()
    assert logits.grad is not None
    # Every token counts 1/L: the big scale weighs in by its token count, not per scale.
    assert torch.allclose(loss, (per_scale_loss * torch.tensor([1.0, 4.0, 9.0])).sum() / 14)


def test_accuracy_per_scale():
    maps = token_maps(batch=2, vocab=8)
    targets = torch.cat([m.flatten(1) for m in maps], dim=1)
    logits = F.one_hot(targets, 8).float() * 10
    logits[:, 5:] = -logits[:, 5:]  # the finest scale is always wrong
    _, _, accuracy = next_scale_loss(logits, maps)
    assert accuracy.tolist() == [1.0, 1.0, 0.0]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="logits"):
        next_scale_loss(torch.randn(2, 13, 8), token_maps(batch=2, vocab=8))
