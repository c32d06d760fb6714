"""Uncertainty: percentile bootstrap intervals of any metric, resampling clusters (lesions) or images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lesionnet.evaluation.metrics.inputs import Metric, check_inputs


def _cluster_layout(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image indices sorted by cluster, each cluster's first position in that order, its size).

    Clusters are numbered in order of first appearance: when every image is its own cluster, cluster k is image k,
    so the cluster bootstrap draws exactly the resamples the image bootstrap drew for the same seed.
    """
    _, first_seen, codes = np.unique(groups, return_index=True, return_inverse=True)
    rank = np.empty(len(first_seen), dtype=np.int64)
    rank[np.argsort(first_seen, kind="stable")] = np.arange(len(first_seen))
    cluster_of_image = rank[codes.reshape(-1)]
    sizes = np.bincount(cluster_of_image)
    return np.argsort(cluster_of_image, kind="stable"), np.cumsum(sizes) - sizes, sizes


def bootstrap_ci(
    probs: np.ndarray,
    targets: np.ndarray,
    metric: Metric,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: np.ndarray | Sequence[str] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of ``metric``, resampling clusters (e.g. lesions) with replacement.

    Images of one lesion are correlated, so resampling images treats them as independent evidence and gives too
    narrow an interval; with ``groups`` (one cluster id per image) whole clusters are drawn, all their images
    together. ``groups=None`` makes every image its own cluster: the plain image bootstrap, for sets whose lesion
    ids are unknown. All cluster draws are made in one call, so the loop only gathers indices and runs ``metric``;
    use the numpy helpers (:func:`accuracy`, :func:`balanced_accuracy`, :func:`log_loss`) to keep 1000 resamples
    well under a second. Resamples where the metric is NaN (e.g. a class drawn zero times) are ignored.
    """
    probs, targets = check_inputs(probs, targets)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    clusters = np.arange(len(targets)) if groups is None else np.asarray(groups)
    if clusters.shape != targets.shape:
        raise ValueError(f"groups must hold one cluster id per image: {clusters.shape} for {targets.shape} targets")
    order, starts, sizes = _cluster_layout(clusters)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(sizes), size=(n_boot, len(sizes)))
    stats = np.empty(n_boot, dtype=np.float64)
    for resample, drawn in enumerate(draws):
        drawn_sizes = sizes[drawn]
        # positions starts[c], starts[c] + 1, ..., starts[c] + sizes[c] - 1 of every drawn cluster c, in draw order
        offsets = np.arange(drawn_sizes.sum()) - np.repeat(np.cumsum(drawn_sizes) - drawn_sizes, drawn_sizes)
        idx = order[np.repeat(starts[drawn], drawn_sizes) + offsets]
        stats[resample] = metric(probs[idx], targets[idx])
    low, high = np.nanquantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
