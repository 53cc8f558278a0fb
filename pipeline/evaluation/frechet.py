"""Frechet distance between Gaussians fitted to two feature sets (FID when the features are Inception's).

d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the formula of the original FID code; the trace
of the matrix square root is taken through symmetric eigendecompositions (see trace_sqrt_product).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = scipy.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(first: np.ndarray, second: np.ndarray) -> float:
    """Tr (S1 S2)^(1/2) for covariance matrices, through the symmetric S1^(1/2) S2 S1^(1/2).

    It has the eigenvalues of S1 S2, so the trace equals scipy.linalg.sqrtm(S1 @ S2)'s (checked in the
    tests); two symmetric eigendecompositions are about twice as fast as sqrtm at 2048-d, stay real,
    and need no offset when N is below the dimension (singular covariances).
    """
    root = _psd_sqrt(first)
    eigenvalues = scipy.linalg.eigvalsh(root @ second @ root)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(first: FeatureStatistics, second: FeatureStatistics) -> float:
    mean_difference = first.mean - second.mean
    distance = (mean_difference @ mean_difference + np.trace(first.covariance) + np.trace(second.covariance)
                - 2.0 * trace_sqrt_product(first.covariance, second.covariance))
    return float(max(distance, 0.0))
