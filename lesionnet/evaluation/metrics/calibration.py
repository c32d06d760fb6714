"""Calibration: the top-label and the class-wise expected calibration error, the Brier score and the reliability
diagram's bins. (The temperature and the calibration of the shown probabilities that improve them are fitted in
``fits`` and applied by ``lesionnet.inference.decision.combine``.)

Top-label ECE looks only at the largest probability of each image, so it misses probabilities that are wrong per
class: a logit-adjusted model that shows P(df) 0.11 where df makes up 1% of the images can keep a small top-label ECE.
The class-wise ECE (Kull et al. 2019; Nixon et al. 2019) and the Brier score look at every class's probability.
"""

from __future__ import annotations

import numpy as np
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

from lesionnet.evaluation.metrics.inputs import check_inputs, plain_float, to_tensors

ECE_BINS = 15


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE (torchmetrics, L1, equal-width bins): the sample-weighted gap between confidence and accuracy."""
    probs, targets = check_inputs(probs, targets)
    p, t = to_tensors(probs, targets)
    return plain_float(multiclass_calibration_error(p, t, probs.shape[1], n_bins=n_bins, norm="l1"))


def classwise_calibration_error(probs: np.ndarray, targets: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Class-wise ECE: per class k, the binned gap between P(k) and the frequency of k over all images (torchmetrics'
    binary ECE, L1, equal-width bins), averaged over the K classes. 0 when every class's probability is calibrated."""
    probs, targets = check_inputs(probs, targets)
    errors = [
        binary_calibration_error(*to_tensors(probs[:, k], targets == k), n_bins=n_bins, norm="l1")
        for k in range(probs.shape[1])
    ]
    return plain_float(float(np.mean([float(e) for e in errors])))


def brier_score(probs: np.ndarray, targets: np.ndarray) -> float:
    """Multi-class Brier score: the mean over images of the squared distance between the probabilities and the one-hot
    label, summed over classes (0 is perfect, 2 the worst)."""
    probs, targets = check_inputs(probs, targets)
    onehot = np.eye(probs.shape[1])[targets]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


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
