"""Probabilities in, probabilities out: the ensemble mean, post-hoc logit adjustment, temperature scaling and the
calibration of the shown probabilities (per-class scale and bias).

The one implementation of each, used by the inference core (:class:`~lesionnet.inference.Predictor`, hence the app
and export), by evaluate.py (its rows, and the fits in ``lesionnet.evaluation.metrics``) and by the referral policy
(the calibrated percentages the page shows; the on-device page gets the temperature from its policy file). All work on
softmax *probabilities*: ``log p`` serves as the logits, since softmax(log p) = p, so ensembles are treated alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.special import softmax

from lesionnet.contract.scores import LogitAdjustment


def as_logits(probs: np.ndarray) -> np.ndarray:
    """log p as logits: softmax(log p) = p, so scaling works on any probabilities, ensembles included."""
    return np.log(np.clip(probs, 1e-12, 1.0))


def average_probs(members: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted mean of members' softmax probabilities (weights are normalised to sum to 1)."""
    if len(members) == 0:
        raise ValueError("No ensemble members to average")
    shapes = {np.shape(m) for m in members}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"All members must share one (N, K) shape, got {[np.shape(m) for m in members]}")
    w = np.ones(len(members)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(members),) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"Need {len(members)} non-negative weights with a positive sum, got {weights}")
    stack = np.stack([np.asarray(m, dtype=np.float64) for m in members])
    return np.tensordot(w / w.sum(), stack, axes=1)


def adjust_logits(probs: np.ndarray, prior: Sequence[float], tau: float) -> np.ndarray:
    """Post-hoc logit adjustment (Menon et al., ICLR 2021): softmax(log p - tau * log prior). tau = 1 turns a
    classifier of the training distribution into one of balanced classes; tau = 0 changes nothing."""
    prior_array = np.asarray(prior, dtype=np.float64)
    if prior_array.shape != (probs.shape[1],) or (prior_array <= 0).any():
        raise ValueError(f"prior needs {probs.shape[1]} positive class frequencies, got {list(prior)}")
    return softmax(as_logits(probs) - tau * np.log(prior_array), axis=1)


def combine(
    members: Sequence[np.ndarray],
    weights: Sequence[float] | None = None,
    logit_adjustment: LogitAdjustment | None = None,
) -> np.ndarray:
    """The ensemble's probabilities: the weighted mean of the members' (N, K) probabilities, then, when given, the
    post-hoc logit adjustment (tau and training prior) evaluate.py fitted on validation."""
    probs = average_probs(members, weights)
    if logit_adjustment is not None:
        probs = adjust_logits(probs, logit_adjustment.prior, logit_adjustment.tau)
    return probs


def apply_scaling(
    probs: np.ndarray, scale: Sequence[float] | np.ndarray, bias: Sequence[float] | np.ndarray
) -> np.ndarray:
    """softmax(scale * log p + bias) per class, over the last axis (one image (K,) or a batch (N, K)): the shown
    probabilities of a row (``DisplayCalibration`` in scores.json, fitted on validation by evaluate.py). Scale 1/T and
    bias 0 is temperature scaling; a bias tau * log prior / T undoes a logit adjustment before the temperature."""
    probs = np.asarray(probs)
    scale_array, bias_array = np.asarray(scale, dtype=np.float64), np.asarray(bias, dtype=np.float64)
    if scale_array.shape != (probs.shape[-1],) or bias_array.shape != scale_array.shape or (scale_array <= 0).any():
        raise ValueError(f"need {probs.shape[-1]} positive scales and {probs.shape[-1]} biases, got {scale}, {bias}")
    return softmax(as_logits(probs) * scale_array + bias_array, axis=-1)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) over the last axis (one image (K,) or a batch (N, K)): the calibrated probabilities;
    argmax (hence accuracy) is unchanged."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return softmax(as_logits(np.asarray(probs)) / temperature, axis=-1)
