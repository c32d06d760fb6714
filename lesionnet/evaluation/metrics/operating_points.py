"""Operating points of one class against the rest (e.g. melanoma): sensitivity and specificity at a threshold, and
the threshold that reaches a target sensitivity."""

from __future__ import annotations

import numpy as np
from torchmetrics.functional.classification import binary_recall, binary_roc, binary_specificity

from lesionnet.evaluation.metrics.inputs import check_inputs, plain_float, to_tensors


def _positives(targets: np.ndarray, positive: int) -> np.ndarray:
    is_pos = targets == positive
    if not is_pos.any():
        raise ValueError(f"No samples of the positive class {positive}: sensitivity is undefined")
    return is_pos


def sensitivity_specificity(
    probs: np.ndarray, targets: np.ndarray, positive: int, threshold: float | None = None
) -> dict[str, float | None]:
    """One-vs-rest sensitivity and specificity of ``positive`` (e.g. melanoma) at an operating point.

    ``threshold=None`` flags a sample when its argmax is ``positive``; otherwise when ``probs[:, positive] >=
    threshold`` (inclusive, matching ROC thresholds and :func:`threshold_for_sensitivity`; torchmetrics' binary
    ``threshold`` is strict, so decisions are made here and passed as labels). A rate with an empty denominator is
    ``None``.
    """
    probs, targets = check_inputs(probs, targets)
    flagged = probs.argmax(axis=1) == positive if threshold is None else probs[:, positive] >= threshold
    decided, truth = to_tensors(flagged, targets == positive)
    n_pos = int(truth.sum())
    return {
        "sensitivity": plain_float(binary_recall(decided, truth)) if n_pos > 0 else None,
        "specificity": plain_float(binary_specificity(decided, truth)) if n_pos < len(truth) else None,
        "threshold": None if threshold is None else float(threshold),
    }


def threshold_for_sensitivity(
    probs: np.ndarray, targets: np.ndarray, positive: int, target_sensitivity: float = 0.95
) -> float:
    """Largest threshold on ``probs[:, positive]`` whose sensitivity here is >= ``target_sensitivity``.

    Pick it on validation data and apply it to test with :func:`sensitivity_specificity`: the "refer to a doctor"
    rule that misses at most ``1 - target_sensitivity`` of the positives it was tuned on. The largest such threshold
    is the one with the best specificity, and it is always one of the positive samples' scores.
    """
    probs, targets = check_inputs(probs, targets)
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    is_pos = _positives(targets, positive)
    _, tpr, thresholds = binary_roc(*to_tensors(probs[:, positive], is_pos))
    reached = tpr.numpy() >= target_sensitivity - 1e-12  # tpr = k / n_pos: forgive round-off at exact fractions
    return float(thresholds.numpy()[reached].max())
