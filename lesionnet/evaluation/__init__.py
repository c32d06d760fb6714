"""Evaluation on predicted probabilities: metrics, operating points, calibration, bootstrap CIs and ensembling.

Plots live in :mod:`lesionnet.evaluation.plots` (not imported here, so metrics never pull in matplotlib).
"""

from lesionnet.evaluation.metrics import (
    accuracy,
    apply_temperature,
    average_probs,
    balanced_accuracy,
    bootstrap_ci,
    check_inputs,
    classification_scores,
    expected_calibration_error,
    fit_temperature,
    greedy_selection,
    log_loss,
    per_class_auroc,
    per_class_roc,
    reliability_bins,
    sensitivity_specificity,
    threshold_for_sensitivity,
)

__all__ = [
    "accuracy",
    "apply_temperature",
    "average_probs",
    "balanced_accuracy",
    "bootstrap_ci",
    "check_inputs",
    "classification_scores",
    "expected_calibration_error",
    "fit_temperature",
    "greedy_selection",
    "log_loss",
    "per_class_auroc",
    "per_class_roc",
    "reliability_bins",
    "sensitivity_specificity",
    "threshold_for_sensitivity",
]
