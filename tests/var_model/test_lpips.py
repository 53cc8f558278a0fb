"""LPIPS on VGG16: the real key layouts, loading from files the test writes, and missing-file lines."""

from __future__ import annotations

import pytest
import torch

from var_model import LPIPS, build_lpips
from var_model.lpips import VGG16_FILE_NAME, unit_normalize

TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def write_weight_files(directory, seed: int = 0):
    """A torchvision-style whole vgg16 state dict (with classifier keys) and an LPIPS vgg.pth, random values."""
    torch.manual_seed(seed)
    donor = LPIPS()
    vgg_state = {f"features.{k}": v.normal_(0, 0.05) for k, v in donor.features.state_dict().items()}
    vgg_state["classifier.0.weight"] = torch.zeros(4, 4)  # a whole vgg16 file also has these
    vgg_state["classifier.0.bias"] = torch.zeros(4)
    lin_state = {f"lin{i}.model.1.weight": getattr(donor, f"lin{i}").model[1].weight.detach().abs()
                 for i in range(5)}
    vgg_path, lin_path = directory / VGG16_FILE_NAME, directory / "vgg.pth"
    torch.save(vgg_state, vgg_path)
    torch.save(lin_state, lin_path)
    return vgg_path, lin_path, vgg_state, lin_state


def test_state_dict_has_torchvision_and_lpips_key_layouts():
    keys = set(LPIPS().state_dict())
    vgg_keys = {f"features.{i}.{p}" for i in TORCHVISION_CONV_INDICES for p in ("weight", "bias")}
    lin_keys = {f"lin{i}.model.1.weight" for i in range(5)}
    assert keys == vgg_keys | lin_keys


def test_loads_weights_from_the_given_files(tmp_path):
    vgg_path, lin_path, vgg_state, lin_state = write_weight_files(tmp_path)
    lpips = build_lpips(vgg_path, lin_path)
    loaded = lpips.state_dict()
    for key, value in vgg_state.items():
        if key.startswith("features."):
            assert torch.equal(loaded[key], value)
    for key, value in lin_state.items():
        assert torch.equal(loaded[key], value)
    assert not lpips.training and not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training  # a fixed metric stays in eval mode


def test_distance_is_zero_on_equal_images_and_grad_reaches_only_the_input(tmp_path):
    vgg_path, lin_path, *_ = write_weight_files(tmp_path)
    lpips = build_lpips(vgg_path, lin_path)
    images = torch.rand(2, 1, 32, 32) * 2 - 1  # grey, repeated to RGB inside
    assert lpips(images, images).abs().item() < 1e-6
    reconstruction = (images + 0.2 * torch.randn_like(images)).requires_grad_()
    distance = lpips(images, reconstruction)
    assert distance.ndim == 0 and distance.item() > 0  # heads are non-negative here
    distance.backward()
    assert reconstruction.grad is not None and reconstruction.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


def test_distance_matches_the_lpips_formula(tmp_path):
    vgg_path, lin_path, *_ = write_weight_files(tmp_path)
    lpips = build_lpips(vgg_path, lin_path)
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    # By hand: ScalingLayer, VGG cut after relu1_2 ... relu5_3, unit-normalise channels, squared
    # difference, weighted channel sum (the 1x1 head), spatial and batch mean, sum over the layers.
    h_x, h_y = ((t - lpips.shift) / lpips.scale for t in (x, y))
    expected, start = torch.zeros(()), 0
    for layer, end in enumerate((4, 9, 16, 23, 30)):
        h_x, h_y = lpips.features[start:end](h_x), lpips.features[start:end](h_y)
        weights = getattr(lpips, f"lin{layer}").model[1].weight.view(1, -1, 1, 1)
        expected = expected + ((unit_normalize(h_x) - unit_normalize(h_y)).square() * weights).sum(1).mean()
        start = end
    assert torch.allclose(lpips(x, y), expected, rtol=1e-4, atol=1e-6)


def test_finds_both_files_in_the_hub_cache(tmp_path, monkeypatch):
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    write_weight_files(checkpoints)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert isinstance(build_lpips(), LPIPS)


def test_a_missing_file_names_it_and_how_to_get_it(tmp_path):
    _, lin_path, *_ = write_weight_files(tmp_path)
    missing = tmp_path / "nowhere" / VGG16_FILE_NAME
    with pytest.raises(FileNotFoundError) as error:
        build_lpips(missing, lin_path)
    message = str(error.value)
    assert str(missing) in message and "IMAGENET1K_V1" in message and "\n" not in message
    with pytest.raises(FileNotFoundError, match=r"lpips/weights/v0\.1/vgg\.pth") as error:
        build_lpips(tmp_path / VGG16_FILE_NAME, tmp_path / "no_vgg.pth")
    assert str(tmp_path / "no_vgg.pth") in str(error.value)
