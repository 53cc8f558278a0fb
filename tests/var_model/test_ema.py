"""EMA of the tokenizer's weights: the warm-up decay, averaging vs copying, exact checkpoint round-trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from var_model import ExponentialMovingAverage, ema_decay


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1))
    model[2].bias.requires_grad_(False)  # a frozen parameter: copied, not averaged
    return model


def perturb(model: nn.Module, amount: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount)
        model[1].running_mean.add_(amount)
        model[1].num_batches_tracked.add_(1)


def test_warm_up_decay_follows_vaex_and_caps_at_the_decay():
    assert ema_decay(0.9999, 0) == pytest.approx(1 / 10)
    assert ema_decay(0.9999, 1) == pytest.approx(1 / 10)  # vaex counts in half steps
    assert ema_decay(0.9999, 16) == pytest.approx(9 / 18)
    assert ema_decay(0.9, 10_000) == 0.9
    assert ema_decay(0.9999, 0, warmup=False) == 0.9999


def test_update_averages_trainable_parameters_and_copies_the_rest():
    model = small_model()
    ema = ExponentialMovingAverage(model, decay=0.9999)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    perturb(model, 1.0)
    decay = ema.update(model)
    assert decay == pytest.approx(0.1)
    weight = model[0].weight.detach()
    assert torch.allclose(ema.averages["0.weight"], 0.1 * start["0.weight"] + 0.9 * weight)
    assert "2.bias" not in ema.averages and torch.equal(ema.copies["2.bias"], model[2].bias)
    assert torch.equal(ema.copies["1.running_mean"], model[1].running_mean)
    assert ema.copies["1.num_batches_tracked"].item() == 1 and ema.num_updates == 1


def test_state_dict_round_trips_exactly_and_copy_to_exports_the_average(tmp_path):
    model = small_model()
    ema = ExponentialMovingAverage(model, decay=0.99)
    for step in range(5):
        perturb(model, 0.1 * (step + 1))
        ema.update(model)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")

    resumed = ExponentialMovingAverage(small_model(), decay=0.5, warmup=False)
    resumed.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert (resumed.decay, resumed.warmup, resumed.num_updates) == (0.99, True, 5)
    for name, tensor in ema.state_dict()["parameters"].items():
        assert torch.equal(resumed.averages[name], tensor)
    for name, tensor in ema.state_dict()["buffers"].items():
        assert torch.equal(resumed.copies[name], tensor)
    perturb(model, 0.3)
    assert ema.update(model) == resumed.update(model)  # the same next step
    assert all(torch.equal(resumed.averages[k], v) for k, v in ema.averages.items())

    exported = small_model()
    ema.copy_to(exported)
    assert torch.equal(exported[0].weight, ema.averages["0.weight"])
    assert torch.equal(exported[1].running_mean, model[1].running_mean)


def test_tracks_a_dict_of_full_tensors_like_gathered_zero3_parameters():
    model = small_model()
    parameters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    ema = ExponentialMovingAverage(parameters, decay=0.9, warmup=False, buffers=buffers)
    moved = {n: t + 1 for n, t in parameters.items()}
    assert ema.update(moved, buffers) == 0.9
    assert torch.allclose(ema.averages["0.weight"], parameters["0.weight"] + 0.1)
    with pytest.raises(KeyError, match="missing"):
        ema.update({"0.weight": moved["0.weight"]})


def test_averages_are_float32_for_low_precision_weights():
    model = small_model().to(torch.bfloat16)
    ema = ExponentialMovingAverage(model)
    assert ema.averages["0.weight"].dtype == torch.float32
    assert ema.copies["1.num_batches_tracked"].dtype == torch.int64
    ema.copy_to(model)
    assert model[0].weight.dtype == torch.bfloat16
