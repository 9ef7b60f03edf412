"""Deterministic one-dimensional k-means, for grouping channels by weight range."""

from __future__ import annotations

import numpy as np

from .errors import SpecError


def kmeans_1d(values: np.ndarray, k: int, seed: int = 0, restarts: int = 8, max_iter: int = 100) -> np.ndarray:
    """Cluster ``values`` into ``k`` groups; returns a group id per value.

    k-means++ seeding from ``numpy.random.default_rng(seed)``, ``restarts`` runs,
    the lowest within-group sum of squares wins. Group ids are ordered by centre
    (group 0 holds the smallest values), so the result does not depend on which
    restart won or on how the ids happened to be drawn.

    >>> kmeans_1d(np.array([0.1, 5.0, 0.2, 5.1, 9.0]), 3).tolist()
    [0, 1, 0, 1, 2]
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if k < 1:
        raise SpecError(f"the number of groups must be at least 1, got {k}")
    if len(x) < k:
        raise SpecError(f"cannot form {k} groups from {len(x)} channels; lower adder_groups to at most {len(x)}")
    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    for _ in range(restarts):
        centres = _plus_plus(x, k, rng)
        for _ in range(max_iter):
            labels = np.abs(x[:, None] - centres[None, :]).argmin(1)
            new = np.array([x[labels == j].mean() if np.any(labels == j) else centres[j] for j in range(k)])
            if np.allclose(new, centres):
                break
            centres = new
        cost = float(((x - centres[labels]) ** 2).sum())
        if cost < best_cost - 1e-12:
            best, best_cost = (labels, centres), cost
    labels, centres = best
    order = np.argsort(centres, kind="stable")
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    return rank[labels]


def _plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min((x[:, None] - np.array(centres)[None, :]) ** 2, axis=1)
        total = d2.sum()
        centres.append(x[rng.choice(len(x), p=d2 / total)] if total > 0 else x[rng.integers(len(x))])
    return np.array(centres, dtype=np.float64)
