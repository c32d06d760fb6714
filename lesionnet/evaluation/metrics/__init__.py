"""Evaluation metrics on predicted probabilities: pure functions of ``probs (N, K)`` and ``targets (N,)``.

Everything torchmetrics provides (accuracy, per-class/macro precision, recall, F1, AUROC, ROC, calibration error,
confusion matrix) comes from torchmetrics; numpy/scipy cover the rest (log loss, the fits of the temperature, the
logit adjustment and the ensemble weights, bootstrap). Applying what is fitted (ensemble mean, logit adjustment,
temperature) is ``lesionnet.inference.decision.combine``'s, the one implementation the app serves with.

One module per concern, their public functions gathered here (``metrics.accuracy``, ``metrics.bootstrap_ci``, ...):

- ``inputs``: the checks every function makes (:func:`check_inputs`) and the one way arrays reach torchmetrics;
- ``classification``: accuracy, balanced accuracy, log loss, per-class AUROC/ROC, :func:`classification_scores`;
- ``calibration``: top-label and class-wise expected calibration error, Brier score, the reliability diagram's bins;
- ``operating_points``: one class against the rest (melanoma): sensitivity/specificity, threshold for a sensitivity;
- ``bootstrap``: percentile intervals of any metric, resampling lesions or images;
- ``fits``: what is fitted on validation: temperature, the calibration of the shown probabilities, logit adjustment,
  ensemble weights and greedy selection.
"""

from lesionnet.evaluation.metrics.bootstrap import bootstrap_ci
from lesionnet.evaluation.metrics.calibration import (
    ECE_BINS,
    brier_score,
    classwise_calibration_error,
    expected_calibration_error,
    reliability_bins,
)
from lesionnet.evaluation.metrics.classification import (
    LOG_LOSS_EPS,
    accuracy,
    balanced_accuracy,
    calibration_figures,
    classification_scores,
    log_loss,
    per_class_auroc,
    per_class_roc,
)
from lesionnet.evaluation.metrics.fits import (
    LOGIT_ADJUSTMENT_GRID,
    SELECTION_METRICS,
    fit_display_calibration,
    fit_ensemble_weights,
    fit_logit_adjustment,
    fit_temperature,
    greedy_selection,
)
from lesionnet.evaluation.metrics.inputs import Metric, check_inputs
from lesionnet.evaluation.metrics.operating_points import sensitivity_specificity, threshold_for_sensitivity

__all__ = [
    "ECE_BINS",
    "LOGIT_ADJUSTMENT_GRID",
    "LOG_LOSS_EPS",
    "SELECTION_METRICS",
    "Metric",
    "accuracy",
    "balanced_accuracy",
    "bootstrap_ci",
    "brier_score",
    "calibration_figures",
    "check_inputs",
    "classification_scores",
    "classwise_calibration_error",
    "expected_calibration_error",
    "fit_display_calibration",
    "fit_ensemble_weights",
    "fit_logit_adjustment",
    "fit_temperature",
    "greedy_selection",
    "log_loss",
    "per_class_auroc",
    "per_class_roc",
    "reliability_bins",
    "sensitivity_specificity",
    "threshold_for_sensitivity",
]
