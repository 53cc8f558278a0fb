"""Evaluation figures on known cases: Frechet distance, KID, precision/recall, Inception Score, PSNR, image
conversions, figures."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.images import decode_png, encode_png, float_to_uint8, resize_uint8, uint8_to_float
from pipeline.evaluation.figures import loss_curves_png, mosaic, sample_grid_png
from pipeline.evaluation.frechet import (
    FeatureStatistics,
    frechet_distance,
    frechet_distance_of_features,
    trace_sqrt_product,
)
from pipeline.evaluation.metrics import inception_score, kernel_inception_distance, manifold_radii, precision_recall
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


def test_frechet_distance_in_the_samples_space_is_the_same_distance():
    rng = np.random.default_rng(2)
    for samples, dimensions in ((30, 200), (200, 64)):  # fewer samples than dimensions, and more
        first, second = rng.normal(size=(samples, dimensions)), rng.normal(0.5, 1.5, size=(samples + 5, dimensions))
        expected = frechet_distance(FeatureStatistics.of(first), FeatureStatistics.of(second))
        assert frechet_distance_of_features(first, second) == pytest.approx(expected, rel=1e-7)


def test_kid_near_zero_for_one_distribution_and_large_for_another():
    rng = np.random.default_rng(0)
    real, same, shifted = rng.normal(size=(300, 32)), rng.normal(size=(300, 32)), rng.normal(1.0, 1.0, (300, 32))
    same_mean, same_std = kernel_inception_distance(real, same, subsets=20, subset_size=100)
    shifted_mean, _ = kernel_inception_distance(real, shifted, subsets=20, subset_size=100)
    assert abs(same_mean) < 3 * same_std + 0.01 and shifted_mean > 50 * max(abs(same_mean), 1e-3)
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(real[:1], same)


def test_precision_recall_of_known_manifolds():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 8))
    # The k-th neighbour radius: on a line of points 0, 1, 2, ... the 3rd neighbour of 0 is at 3.
    assert manifold_radii(np.arange(6, dtype=float)[:, None], 3)[0] == pytest.approx(9.0)
    assert precision_recall(real, rng.normal(size=(400, 8))) > (0.5, 0.5)  # same distribution: both high
    collapsed = precision_recall(real, real[:1] + rng.normal(scale=1e-3, size=(50, 8)))  # one mode only
    assert collapsed[0] == 1.0 and collapsed[1] < 0.05  # every sample realistic, nothing of the variety
    assert precision_recall(real, rng.normal(10.0, 1.0, size=(400, 8))) == (0.0, 0.0)  # off the manifold
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(real[:3], real)


def test_inception_score_bounds():
    uniform = np.full((100, 10), 0.1)  # no confidence: 1
    assert inception_score(uniform) == pytest.approx((1.0, 0.0))
    one_hot = np.eye(10)[np.arange(1000) % 10]  # confident and balanced: the number of classes
    assert inception_score(one_hot, splits=10)[0] == pytest.approx(10.0, rel=1e-6)
    assert inception_score(np.eye(10)[[3] * 100])[0] == pytest.approx(1.0)  # confident, one class only
    assert inception_score(one_hot[:4], splits=10)[0] > 0  # fewer images than splits: one per split
