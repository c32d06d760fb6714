"""Classification metrics on probabilities: fast numpy ones (cheap enough to bootstrap a thousand times) and the
torchmetrics-based report (per-class precision, recall, F1, AUROC, ROC, confusion matrix) of
:func:`classification_scores`.

Macro averages run over the classes present in ``targets``, which is what the official ISIC 2018 Task 3 scorer
(``isic-challenge-scoring``) does: its balanced accuracy and per-class AUC are NaN for an absent class and pandas'
``mean`` skips them. torchmetrics' own macro averages differ there (an absent class that is predicted counts as
recall 0, an absent class's AUROC counts as 0), so macros are taken from its per-class values instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
    multiclass_roc,
)

from lesionnet.evaluation.metrics.calibration import (
    brier_score,
    classwise_calibration_error,
    expected_calibration_error,
)
from lesionnet.evaluation.metrics.inputs import check_inputs, mean_defined, none_where, plain_float, to_tensors

LOG_LOSS_EPS = 1e-7


def accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    """Top-1 accuracy in plain numpy (argmax, first index wins ties): cheap enough to bootstrap a thousand times."""
    return float(np.mean(probs.argmax(axis=1) == targets))


def balanced_accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean recall over the classes present in ``targets`` (ISIC 2018's metric), in plain numpy for bootstrapping."""
    num_classes = probs.shape[1]
    hits = np.bincount(targets[probs.argmax(axis=1) == targets], minlength=num_classes)
    support = np.bincount(targets, minlength=num_classes)
    present = support > 0
    return float(np.mean(hits[present] / support[present]))


def log_loss(probs: np.ndarray, targets: np.ndarray, eps: float = LOG_LOSS_EPS) -> float:
    """Mean negative log-likelihood of the true class; clipping at ``eps`` keeps one confident miss finite."""
    p_true = probs[np.arange(len(targets)), targets]
    return float(-np.mean(np.log(np.clip(p_true, eps, 1.0))))


def calibration_figures(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """How calibrated probabilities are, top-label and per class: ``ece`` (top-label), ``classwise_ece``, ``log_loss``
    and ``brier`` (see ``calibration``)."""
    probs, targets = check_inputs(probs, targets)
    return {
        "ece": expected_calibration_error(probs, targets),
        "classwise_ece": classwise_calibration_error(probs, targets),
        "log_loss": log_loss(probs, targets),
        "brier": brier_score(probs, targets),
    }


def per_class_auroc(probs: np.ndarray, targets: np.ndarray) -> list[float | None]:
    """One-vs-rest AUROC per class; ``None`` for a class with no positives or no negatives (undefined, not 0)."""
    probs, targets = check_inputs(probs, targets)
    num_classes = probs.shape[1]
    support = np.bincount(targets, minlength=num_classes)
    with warnings.catch_warnings():  # torchmetrics warns and scores 0 for such classes; we report None instead
        warnings.filterwarnings("ignore", message=r".*(positive|negative) samples in targets.*")
        values = multiclass_auroc(*to_tensors(probs, targets), num_classes=num_classes, average="none")
    return none_where(values, (support == 0) | (support == len(targets)))


def per_class_roc(probs: np.ndarray, targets: np.ndarray) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """One-vs-rest ROC curve ``(fpr, tpr)`` per class; ``None`` where undefined (see :func:`per_class_auroc`)."""
    probs, targets = check_inputs(probs, targets)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(positive|negative) samples in targets.*")
        fpr, tpr, _ = multiclass_roc(*to_tensors(probs, targets), num_classes=probs.shape[1])
    aurocs = per_class_auroc(probs, targets)
    return [None if auc is None else (x.numpy(), y.numpy()) for x, y, auc in zip(fpr, tpr, aurocs, strict=True)]


def classification_scores(probs: np.ndarray, targets: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """All headline metrics as a JSON-serialisable dict (plain floats, lists, ``None`` for undefined values).

    Keys: ``accuracy``, ``balanced_accuracy`` (macro recall), ``macro_f1``, ``macro_auroc``, ``log_loss``, ``ece``
    (top-label, 15 bins, L1), ``classwise_ece`` (every class's probability, 15 bins, L1), ``brier``, ``per_class``
    ({name: {precision, recall, f1, auroc, support}}), ``confusion_matrix``
    (rows = true class) and ``n``.

    A class absent from ``targets`` has ``recall``, ``f1`` and ``auroc`` ``None`` (no positives to score) and is left
    out of the macro averages, as the ISIC scorer does; its ``precision`` is torchmetrics' (0 when anything was
    predicted as it, all false positives; 0 by the zero-division convention otherwise). Decisions are argmax.
    """
    probs, targets = check_inputs(probs, targets)
    num_classes = probs.shape[1]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} probability columns")
    p, t = to_tensors(probs, targets)
    support = np.bincount(targets, minlength=num_classes)
    absent = support == 0  # undefined recall/F1/AUROC, left out of the macro averages

    per_class_values = {
        "precision": none_where(multiclass_precision(p, t, num_classes, average="none"), np.zeros_like(absent)),
        "recall": none_where(multiclass_recall(p, t, num_classes, average="none"), absent),
        "f1": none_where(multiclass_f1_score(p, t, num_classes, average="none"), absent),
        "auroc": per_class_auroc(probs, targets),
    }
    per_class = {
        name: {**{key: values[c] for key, values in per_class_values.items()}, "support": int(support[c])}
        for c, name in enumerate(class_names)
    }
    return {
        "n": len(targets),
        "accuracy": plain_float(multiclass_accuracy(p, t, num_classes, average="micro")),
        "balanced_accuracy": mean_defined(per_class_values["recall"]),
        "macro_f1": mean_defined(per_class_values["f1"]),
        "macro_auroc": mean_defined(per_class_values["auroc"]),
        "log_loss": log_loss(probs, targets),
        "ece": expected_calibration_error(probs, targets),
        "classwise_ece": classwise_calibration_error(probs, targets),
        "brier": brier_score(probs, targets),
        "per_class": per_class,
        "confusion_matrix": multiclass_confusion_matrix(p, t, num_classes).tolist(),
    }
