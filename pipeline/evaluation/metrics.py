"""The feature-set figures besides FID (pipeline.evaluation.frechet), each as the field computes it.

- KID (Binkowski et al. 2018): the unbiased MMD^2 estimate with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over `subsets` random subsets of `subset_size` per side (the
  defaults of clean-fid and torch-fidelity: 100 subsets of up to 1,000), reported with its std.
- Precision and recall (Kynkaanniemi et al. 2019, "Improved precision and recall metric"): each set's
  manifold is the union of balls around its features, of radius the distance to the k-th nearest
  neighbour in the same set (k=3); precision is the share of generated features inside the real
  manifold, recall the share of real features inside the generated manifold.
- Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) over `splits` splits (10 as usual),
  reported as mean and std over the splits, from class probabilities.
"""

from __future__ import annotations

import numpy as np

CHUNK = 4096  # rows of a distance or kernel matrix held at once


def _polynomial_kernel(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return (first @ second.T / first.shape[1] + 1.0) ** 3


def kernel_inception_distance(first: np.ndarray, second: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial-kernel MMD^2 over random subsets, drawn without replacement."""
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    size = min(subset_size, len(first), len(second))
    if size < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per side, got {len(first)} and {len(second)}")
    rng = np.random.default_rng(seed)
    # Up to a few thousand per side the three kernel matrices are computed once and each subset is a
    # gather; beyond that (N = 50k: 20 GB a matrix) each subset computes its own.
    whole = max(len(first), len(second)) <= CHUNK
    if whole:
        kxx, kyy, kxy = (_polynomial_kernel(first, first), _polynomial_kernel(second, second),
                         _polynomial_kernel(first, second))
    values = []
    for _ in range(subsets):
        x = rng.choice(len(first), size, replace=False)
        y = rng.choice(len(second), size, replace=False)
        if whole:
            within_x, within_y, between = kxx[np.ix_(x, x)], kyy[np.ix_(y, y)], kxy[np.ix_(x, y)]
        else:
            within_x, within_y = _polynomial_kernel(first[x], first[x]), _polynomial_kernel(second[y], second[y])
            between = _polynomial_kernel(first[x], second[y])
        values.append((within_x.sum() - np.trace(within_x)) / (size * (size - 1))
                      + (within_y.sum() - np.trace(within_y)) / (size * (size - 1))
                      - 2.0 * between.mean())
    return float(np.mean(values)), float(np.std(values))


def _squared_distances(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    squared = (first ** 2).sum(1)[:, None] + (second ** 2).sum(1)[None, :] - 2.0 * first @ second.T
    return np.maximum(squared, 0.0)


def manifold_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Squared distance of every feature to its k-th nearest neighbour in the same set (itself excluded),
    computed `CHUNK` rows at a time."""
    radii = np.empty(len(features))
    for start in range(0, len(features), CHUNK):
        distances = _squared_distances(features[start:start + CHUNK], features)
        radii[start:start + CHUNK] = np.partition(distances, k, axis=1)[:, k]  # column 0: the point itself
    return radii


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """For each point: is it within some centre's radius (squared distances), `CHUNK` points at a time."""
    return np.concatenate([(_squared_distances(points[start:start + CHUNK], centres) <= radii[None, :]).any(axis=1)
                           for start in range(0, len(points), CHUNK)])


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of `generated` against `real` by the k-NN manifold estimate."""
    real, generated = np.asarray(real, dtype=np.float64), np.asarray(generated, dtype=np.float64)
    if min(len(real), len(generated)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} feature vectors per side, "
                         f"got {len(real)} and {len(generated)}")
    precision = _inside(generated, real, manifold_radii(real, k)).mean()
    recall = _inside(real, generated, manifold_radii(generated, k)).mean()
    return float(precision), float(recall)


def inception_score(probabilities: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` splits of exp(E KL(p(y|x) || p(y))); probabilities [N, classes], rows sum to 1."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    splits = max(1, min(splits, len(probabilities)))
    if len(probabilities) == 0:
        raise ValueError("the Inception Score needs at least one image")
    eps = 1e-12
    scores = []
    for part in np.array_split(probabilities, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + eps) - np.log(marginal + eps))).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
