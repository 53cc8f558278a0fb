"""Evaluation figures on known cases: Frechet distance, PSNR, image conversions, figures."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.images import decode_png, encode_png, float_to_uint8, resize_uint8, uint8_to_float
from pipeline.evaluation.figures import loss_curves_png, mosaic, sample_grid_png
from pipeline.evaluation.frechet import FeatureStatistics, frechet_distance, trace_sqrt_product
from pipeline.evaluation.reconstruction import MAX_PSNR_DB, psnr


def test_frechet_distance_of_known_gaussians():
    # d^2 = |m1 - m2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2); diagonal: sum (sqrt(a) - sqrt(b))^2.
    first = FeatureStatistics(np.array([0.0, 0.0]), np.diag([1.0, 4.0]), 100)
    second = FeatureStatistics(np.array([3.0, 0.0]), np.diag([4.0, 9.0]), 100)
    assert frechet_distance(first, second) == pytest.approx(9.0 + (1 - 2) ** 2 + (2 - 3) ** 2)


def test_trace_of_the_square_root_matches_scipy_sqrtm():
    import scipy.linalg

    rng = np.random.default_rng(1)
    first = np.cov(rng.normal(size=(40, 16)), rowvar=False)
    second = np.cov(rng.normal(size=(40, 16)) * 2 + 1, rowvar=False)
    expected = np.trace(scipy.linalg.sqrtm(first @ second)).real
    assert trace_sqrt_product(first, second) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_self_zero_and_shift_visible_with_few_samples():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 64))  # fewer samples than dimensions: singular covariance
    stats = FeatureStatistics.of(features)
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-6)
    shifted = FeatureStatistics.of(features + 2.0)
    assert frechet_distance(stats, shifted) == pytest.approx(64 * 4.0, rel=1e-6)


def test_psnr_known_case():
    reference = np.full((2, 4, 4), 100, dtype=np.uint8)
    noisy = reference.astype(np.int32).copy()
    noisy[0] += 10  # MSE 100 -> 10 log10(255^2 / 100) = 28.13 dB
    noisy[1, 0, 0] += 40  # MSE 1600 / 16 = 100 -> the same
    values = psnr(reference, noisy)
    assert values == pytest.approx([20 * np.log10(255 / 10)] * 2)
    assert psnr(reference, reference)[0] == MAX_PSNR_DB
    assert psnr(np.zeros((1, 3)), np.full((1, 3), 0.5), data_range=1.0)[0] == pytest.approx(6.0206, abs=1e-4)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(reference, reference[:, :2])


def test_image_conversions_round_trip():
    images = torch.linspace(0, 1, 2 * 1 * 4 * 4).reshape(2, 1, 4, 4)
    uint8 = float_to_uint8(images)
    assert uint8.shape == (2, 4, 4) and uint8.dtype == np.uint8 and uint8[1, 3, 3] == 255
    back = uint8_to_float(uint8)
    assert back.shape == (2, 1, 4, 4) and back.min() == -1.0 and back.max() == 1.0
    assert float_to_uint8(torch.rand(3, 3, 5, 5)).shape == (3, 5, 5, 3)
    assert np.array_equal(decode_png(encode_png(uint8[0])), uint8[0])
    assert encode_png(uint8[0]) == encode_png(uint8[0].copy())  # same pixels, same bytes
    assert resize_uint8(uint8, 4) is uint8
    assert resize_uint8(np.zeros((3, 32, 32), np.uint8), 28).shape == (3, 28, 28)


def test_sample_grid_has_one_row_per_class():
    rows = [np.full((3, 8, 8), value, dtype=np.uint8) for value in (0, 128)]
    canvas = mosaic(rows, padding=2)
    assert canvas.shape == (2 + 2 * 10, 2 + 3 * 10)
    assert canvas[2, 2] == 0 and canvas[12, 2] == 128 and canvas[0, 0] == 255
    with Image.open(io.BytesIO(sample_grid_png(rows, ["zero", "gray"]))) as image:
        assert image.format == "PNG" and image.width > image.height


def test_loss_curves_from_training_metrics():
    records = [{"step": step, "loss": 5.0 / (step + 1), "samples_per_second": 10.0} for step in range(5)]
    with Image.open(io.BytesIO(loss_curves_png({"tokenizer": records, "gpt": records, "empty": []}))) as image:
        assert image.format == "PNG" and image.width > image.height
    with pytest.raises(ValueError, match="no training metrics"):
        loss_curves_png({"gpt": []})
