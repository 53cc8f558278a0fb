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


def frechet_distance_of_features(first: np.ndarray, second: np.ndarray) -> float:
    """The Frechet distance of two feature sets [N, D], the same value as through FeatureStatistics.

    With fewer samples than dimensions (N = 1,000 Inception features of 2,048-d) it works in the samples'
    space: with A, B the centred features, S1 = A'A / (n1 - 1) and S2 = B'B / (n2 - 1), the non-zero
    eigenvalues of S1 S2 are those of C C' with C = A B' / sqrt((n1 - 1)(n2 - 1)), so Tr (S1 S2)^(1/2) is
    the sum of C's singular values: one n1 x n2 SVD instead of two D x D eigendecompositions.
    """
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if min(len(first), len(second)) >= first.shape[1]:
        return frechet_distance(FeatureStatistics.of(first), FeatureStatistics.of(second))
    if min(len(first), len(second)) < 2:
        raise ValueError(f"need at least 2 feature vectors per side, got {len(first)} and {len(second)}")
    mean_difference = first.mean(axis=0) - second.mean(axis=0)
    centred_first, centred_second = first - first.mean(axis=0), second - second.mean(axis=0)
    scale_first, scale_second = len(first) - 1, len(second) - 1
    cross = np.linalg.svd(centred_first @ centred_second.T, compute_uv=False).sum() / np.sqrt(scale_first * scale_second)
    distance = (mean_difference @ mean_difference + (centred_first ** 2).sum() / scale_first
                + (centred_second ** 2).sum() / scale_second - 2.0 * cross)
    return float(max(distance, 0.0))
