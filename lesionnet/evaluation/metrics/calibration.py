"""Calibration: the top-label expected calibration error and the reliability diagram's bins. (The temperature that
improves it is fitted in ``fits`` and applied by ``lesionnet.inference.decision.combine``.)"""

from __future__ import annotations

import numpy as np
from torchmetrics.functional.classification import multiclass_calibration_error

from lesionnet.evaluation.metrics.inputs import check_inputs, plain_float, to_tensors

ECE_BINS = 15


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE (torchmetrics, L1, equal-width bins): the sample-weighted gap between confidence and accuracy."""
    probs, targets = check_inputs(probs, targets)
    p, t = to_tensors(probs, targets)
    return plain_float(multiclass_calibration_error(p, t, probs.shape[1], n_bins=n_bins, norm="l1"))


def reliability_bins(
    probs: np.ndarray, targets: np.ndarray, n_bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: mean top-label confidence, accuracy (NaN if empty) and count, for plotting."""
    probs, targets = check_inputs(probs, targets)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == targets).astype(np.float64)
    bins = np.clip((confidence * n_bins).astype(np.int64), 0, n_bins - 1)  # [k/n, (k+1)/n), confidence 1 -> last
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, weights=confidence, minlength=n_bins) / count
        acc = np.bincount(bins, weights=correct, minlength=n_bins) / count
    return mean_conf, acc, count
