"""The two judging networks on real Fashion-MNIST: the CNN classifier and the offline Inception FID."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.sources.fashion_mnist import load_fashion_mnist
from pipeline.evaluation.classifier import accuracy, load_or_train_classifier, predict
from pipeline.evaluation.frechet import FeatureStatistics, frechet_distance
from pipeline.evaluation.inception import FEATURE_DIM, inception_features, inception_input


@pytest.fixture(scope="module")
def fashion(fashion_mnist_dir):
    train_images, train_labels = load_fashion_mnist("train", fashion_mnist_dir)
    test_images, test_labels = load_fashion_mnist("test", fashion_mnist_dir)
    return train_images[:6000], train_labels[:6000], test_images[:1000], test_labels[:1000]


def test_classifier_learns_and_is_cached(fashion, tmp_path):
    train_images, train_labels, test_images, test_labels = fashion
    cache = str(tmp_path / "cache" / "classifier.safetensors")
    model = load_or_train_classifier(cache, train_images, train_labels, epochs=1, seed=0)
    assert accuracy(model, test_images, test_labels) > 0.6  # chance is 0.1; ~0.8 after 6k images
    again = load_or_train_classifier(cache, train_images[:10], train_labels[:10])  # loads, does not retrain
    first, first_features = predict(model, test_images[:200])
    second, second_features = predict(again, test_images[:200])
    assert np.array_equal(first, second) and np.allclose(first_features, second_features)

    # Its features separate real from noise: a Frechet distance near 0 for two real halves, large for noise.
    _, real_a = predict(model, test_images[:500])
    _, real_b = predict(model, test_images[500:])
    noise = np.random.default_rng(0).integers(0, 256, size=(500, 28, 28), dtype=np.uint8)
    _, noise_features = predict(model, noise)
    real_distance = frechet_distance(FeatureStatistics.of(real_a), FeatureStatistics.of(real_b))
    noise_distance = frechet_distance(FeatureStatistics.of(real_a), FeatureStatistics.of(noise_features))
    assert noise_distance > 20 * real_distance


def test_inception_input_convention():
    gray = np.array([[[0, 128], [255, 64]]], dtype=np.uint8)
    batch = inception_input(gray)
    assert batch.shape == (1, 3, 299, 299)
    assert float(batch.min()) == -1.0 and float(batch.max()) == pytest.approx(0.9921875)
    assert np.array_equal(batch[0, 0].numpy(), batch[0, 2].numpy())  # gray repeated to 3 channels


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_inception_fid_self_zero_and_noise_large(fashion):
    """Tiny N (Inception runs at ~5-10 img/s on 2 cores): the ordering is what is checked."""
    _, _, test_images, _ = fashion
    real = inception_features(test_images[:12], batch_size=12)
    assert real.shape == (12, FEATURE_DIM) and np.isfinite(real).all()
    noise = inception_features(np.random.default_rng(0).integers(0, 256, (12, 28, 28), dtype=np.uint8),
                               batch_size=12)
    real_stats = FeatureStatistics.of(real)
    assert frechet_distance(real_stats, real_stats) == pytest.approx(0.0, abs=1e-3)
    assert frechet_distance(real_stats, FeatureStatistics.of(noise)) > 100.0
