"""Frechet distance between Gaussians fitted to two feature sets (FID when the features are Inception's).

d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), computed as in the original FID code
(scipy.linalg.sqrtm, a small diagonal offset when the product is singular, the real part kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import warnings

import numpy as np
import scipy.linalg


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean and covariance of a feature set, and how many samples they came from."""

    mean: np.ndarray
    covariance: np.ndarray
    count: int

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStatistics:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"need at least 2 feature vectors of shape [N, D], got {features.shape}")
        return cls(features.mean(axis=0), np.cov(features, rowvar=False), len(features))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "covariance": self.covariance, "count": np.array(self.count)}

    @classmethod
    def from_arrays(cls, arrays) -> FeatureStatistics:
        return cls(np.asarray(arrays["mean"]), np.asarray(arrays["covariance"]), int(arrays["count"]))


def frechet_distance(first: FeatureStatistics, second: FeatureStatistics, eps: float = 1e-6) -> float:
    mean_difference = first.mean - second.mean
    with warnings.catch_warnings():  # a singular product is expected below D samples; handled just below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covariance_root = scipy.linalg.sqrtm(first.covariance @ second.covariance)
    if not np.isfinite(covariance_root).all():
        # Singular product (N below the feature dimension): offset both diagonals, as the FID code does.
        offset = np.eye(first.covariance.shape[0]) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            covariance_root = scipy.linalg.sqrtm((first.covariance + offset) @ (second.covariance + offset))
    covariance_root = np.real(covariance_root)
    distance = (mean_difference @ mean_difference + np.trace(first.covariance) + np.trace(second.covariance)
                - 2.0 * np.trace(covariance_root))
    return float(max(distance, 0.0))
