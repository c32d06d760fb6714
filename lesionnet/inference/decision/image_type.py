"""The app's first question: is this a dermatoscope image at all? (Refuse only what is not.)

Why a separate question: the feature-space distance of :mod:`lesionnet.inference.decision.ood` measures "unlike the
validation lesions of HAM10000". Another clinic's dermatoscope and an atypical melanoma are exactly that, so as a
refusal it turned away a third of Derm7pt's real lesions (half of its melanomas) while a third of ordinary phone
photos still got an answer (issue 22). "Is this dermoscopy?" is a two-class question with negatives one can collect
(ordinary photos, phone photos of skin without a dermatoscope), so it is answered by a classifier trained on both:

* score: a logistic regression on the L2-normalised stage statistics of the served model (each backbone stage's
  channel means and standard deviations, ``lesionnet.inference.predictor.stage_statistics``: colour and texture at
  every scale, from the same forward pass; in the exported ONNX graph one more matrix-vector product). Measured
  before choosing (bench/image_type_eval.py): the pooled last-layer features, which say *which lesion*, refused 72%
  of the held-out-by-fold phone and package photos at a 99% pass rate of dermatoscope images; the stage statistics
  93%;
* threshold on the logit, set on out-of-fold scores of the positives (dermatoscope images) of the fitting data, so
  that a chosen share of them passes (:func:`fit_image_type`); what it refuses is then measured on held-out photos.

The fit is a ridge-penalised, class-balanced logistic regression by L-BFGS (scipy), so the app needs no scikit-learn.
Which features and which penalty were chosen, on which data, and what the gate does on held-out sets:
``bench/image_type_eval.py`` and docs/PERFORMANCE.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize

from lesionnet.contract.gates import (
    REFIT_IMAGE_TYPE,
    ImageTypeGateFile,
    StoredArray,
    check_fitted_for,
    read_image_type_gate,
    write_image_type_gate,
)
from lesionnet.inference.decision.ood import l2_normalise

DEFAULT_PASS_RATE = 0.99  # share of out-of-fold dermatoscope images the threshold lets through
DEFAULT_L2 = 1e-4


def fit_logistic(
    features: np.ndarray, labels: np.ndarray, l2: float = DEFAULT_L2, sample_weight: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """(weights, bias) of a ridge-penalised logistic regression of ``labels`` (1 = dermatoscope image) on the
    L2-normalised ``features`` (stage statistics); classes weighted to equal total weight unless ``sample_weight``
    is given."""
    x = l2_normalise(features)
    y = np.asarray(labels, dtype=np.float64)
    if set(np.unique(y)) != {0.0, 1.0}:
        raise ValueError("The image-type gate needs both dermatoscope images (label 1) and other images (label 0).")
    if sample_weight is None:
        sample_weight = np.where(y == 1, 0.5 / y.sum(), 0.5 / (1 - y).sum())
    w = np.asarray(sample_weight, dtype=np.float64)
    sign = 2 * y - 1

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        margin = sign * (x @ params[:-1] + params[-1])
        value = float(w @ np.logaddexp(0, -margin)) + 0.5 * l2 * float(params[:-1] @ params[:-1])
        slope = -w * sign * np.exp(-np.logaddexp(0, margin))  # d loss / d logit
        grad = np.append(x.T @ slope + l2 * params[:-1], slope.sum())
        return value, grad

    result = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B", options={"maxiter": 2000})
    return result.x[:-1], float(result.x[-1])


def image_type_logits(features: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(N,) the gate's score of stage statistics, higher = more like a dermatoscope image: one torch function for the
    server (float64)
    and the exported ONNX graph (float32, ``lesionnet.export``)."""
    unit = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return unit @ weights + bias


def logit(features: np.ndarray, weights: np.ndarray, bias: float) -> np.ndarray:
    """:func:`image_type_logits` of numpy features, in float64."""
    as_tensor = torch.from_numpy(np.asarray(features, dtype=np.float64))
    scores = image_type_logits(as_tensor, torch.from_numpy(np.asarray(weights, dtype=np.float64)), torch.tensor(bias))
    return scores.numpy()


def out_of_fold_logits(
    features: np.ndarray, labels: np.ndarray, groups: Sequence[str], folds: int = 5, l2: float = DEFAULT_L2
) -> np.ndarray:
    """Each image's logit from a fit that did not see its group (lesion, patient, scene): an in-sample logit is
    biased away from the threshold, which would then refuse more new dermatoscope images than intended."""
    unique = np.array(sorted(set(groups)))
    rng = np.random.default_rng(0)
    fold_of = dict(zip(unique, rng.permutation(len(unique)) % folds, strict=True))
    fold = np.array([fold_of[g] for g in groups])
    scores = np.empty(len(labels))
    for k in range(folds):
        held = fold == k
        weights, bias = fit_logistic(features[~held], labels[~held], l2)
        scores[held] = logit(features[held], weights, bias)
    return scores


@dataclass(frozen=True)
class ImageTypeGate:
    """Refuse an image whose dermoscopy logit is below ``threshold`` (fitted for one model and TTA)."""

    weights: np.ndarray = field(repr=False)
    bias: float
    threshold: float
    model_version: str
    tta: str
    l2: float = DEFAULT_L2
    fit: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N,) logits of stage statistics (``Prediction.stage_stats``): higher = more like a dermatoscope image."""
        return logit(features, self.weights, self.bias)

    def refuses_score(self, scores: np.ndarray) -> np.ndarray:
        """(N,) True where a score is below the threshold: the one refusal rule (the on-device page applies it too)."""
        return np.asarray(scores) < self.threshold

    def refuses(self, features: np.ndarray) -> np.ndarray:
        return self.refuses_score(self.score(features))

    def to_file(self) -> ImageTypeGateFile:
        return ImageTypeGateFile(
            model_version=self.model_version,
            tta=self.tta,
            weights=StoredArray.of(self.weights),
            bias=self.bias,
            threshold=self.threshold,
            l2=self.l2,
            fit=self.fit,
            source=self.source,
        )

    def save(self, path: str | Path) -> Path:
        return write_image_type_gate(self.to_file(), path)

    @classmethod
    def load(cls, path: str | Path, model_version: str, tta: str | None = None) -> ImageTypeGate:
        """The gate in ``path``; refused unless fitted for ``model_version`` (``Predictor.version``) and ``tta``."""
        stored = read_image_type_gate(path)
        why = "its weights read another model's features"
        check_fitted_for(path, (stored.model_version, stored.tta), (model_version, tta), why, REFIT_IMAGE_TYPE)
        return cls(
            weights=stored.weights.array().astype(np.float64),
            bias=stored.bias,
            threshold=stored.threshold,
            model_version=stored.model_version,
            tta=stored.tta,
            l2=stored.l2,
            fit=stored.fit,
            source=stored.source,
        )


def fit_image_type(
    features: np.ndarray,
    labels: Sequence[int],
    groups: Sequence[str],
    model_version: str,
    tta: str,
    pass_rate: float = DEFAULT_PASS_RATE,
    l2: float = DEFAULT_L2,
    folds: int = 5,
    counts: dict[str, int] | None = None,
) -> ImageTypeGate:
    """The gate fitted on all of ``features`` (label 1 = dermatoscope image, 0 = other; ``groups`` keep a lesion,
    patient or scene in one fold), thresholded at the (1 - ``pass_rate``) quantile of the positives' out-of-fold
    logits. ``counts``: images per source, recorded in the file."""
    if not 0 < pass_rate < 1:
        raise ValueError(f"pass_rate must be in (0, 1), got {pass_rate}.")
    y = np.asarray(labels, dtype=np.float64)
    oof = out_of_fold_logits(features, y, groups, folds, l2)
    threshold = float(np.quantile(oof[y == 1], 1 - pass_rate))
    weights, bias = fit_logistic(features, y, l2)
    fit = {
        "positives": int(y.sum()),
        "negatives": int((1 - y).sum()),
        "folds": folds,
        "pass_rate": pass_rate,
        "oof_negatives_refused": float(np.mean(oof[y == 0] < threshold)),
        "counts": counts or {},
    }
    source = (
        f"logistic regression on the pooled features, {int(y.sum())} dermatoscope images vs {int((1 - y).sum())} "
        f"other images; threshold passes {pass_rate:.1%} of the dermatoscope images out of fold"
    )
    return ImageTypeGate(
        weights=weights,
        bias=bias,
        threshold=threshold,
        model_version=model_version,
        tta=tta,
        l2=l2,
        fit=fit,
        source=source,
    )
