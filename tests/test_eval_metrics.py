"""Evaluation metrics by hand, operating points, calibration, bootstrap, ensembling, ISIC agreement and plots."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_recall

from lesionnet.classes import CLASS_NAMES
from lesionnet.evaluation import metrics, plots
from lesionnet.inference.decision import combine

torch.set_num_threads(1)  # tiny tensors; leave the cores to whatever else runs on the machine

# Ten images, three classes (4/3/3). Argmax per row in the comment; no row has a tied maximum.
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],  # t0 -> 0
        [0.5, 0.3, 0.2],  # t0 -> 0
        [0.6, 0.1, 0.3],  # t0 -> 0
        [0.3, 0.5, 0.2],  # t0 -> 1
        [0.1, 0.7, 0.2],  # t1 -> 1
        [0.2, 0.3, 0.5],  # t1 -> 2
        [0.1, 0.6, 0.3],  # t1 -> 1
        [0.1, 0.1, 0.8],  # t2 -> 2
        [0.1, 0.6, 0.3],  # t2 -> 1
        [0.4, 0.3, 0.3],  # t2 -> 0
    ]
)
TARGETS = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def scores() -> dict:
    return metrics.classification_scores(PROBS, TARGETS, NAMES)


def random_predictions(n: int, k: int, seed: int, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Informative but imperfect softmax outputs: the true class gets a logit bonus of ``signal``."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, k, size=n)
    logits = rng.normal(size=(n, k)) + signal * np.eye(k)[targets]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, targets


def calibrated_predictions(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities with labels drawn from them, so they are calibrated by construction (best T is 1)."""
    probs, _ = random_predictions(n, k, seed)
    draws = np.random.default_rng(seed + 1000).random((n, 1))
    return probs, (draws > probs.cumsum(axis=1)).sum(axis=1).clip(max=k - 1)


# ----------------------------------------------------------------------------- headline metrics by hand


def test_confusion_matrix_has_true_classes_as_rows(scores: dict) -> None:
    # t0 predicted 0,0,0,1; t1 predicted 1,2,1; t2 predicted 2,1,0
    assert scores["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [1, 1, 1]]
    assert scores["n"] == 10


def test_accuracy_balanced_accuracy_and_macro_f1_match_hand_values(scores: dict) -> None:
    assert scores["accuracy"] == pytest.approx(6 / 10)  # diagonal 3 + 2 + 1
    assert scores["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 1 / 3) / 3)  # mean recall = 0.58333
    assert scores["macro_f1"] == pytest.approx((3 / 4 + 4 / 7 + 2 / 5) / 3, abs=1e-6)  # per-class F1s below


def test_per_class_precision_recall_f1_match_hand_values(scores: dict) -> None:
    # columns of the confusion matrix sum to 4, 4, 2 predictions; rows to 4, 3, 3 true samples
    expected = {
        "a": {"precision": 3 / 4, "recall": 3 / 4, "f1": 3 / 4, "support": 4},
        "b": {"precision": 2 / 4, "recall": 2 / 3, "f1": 2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3), "support": 3},  # 4/7
        "c": {"precision": 1 / 2, "recall": 1 / 3, "f1": 2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3), "support": 3},  # 2/5
    }
    for name, values in expected.items():
        for key, value in values.items():
            assert scores["per_class"][name][key] == pytest.approx(value, abs=1e-6), (name, key)


def test_per_class_auroc_counts_tied_scores_as_half_a_win(scores: dict) -> None:
    # AUROC = P(score of a positive > score of a negative), ties counting 1/2, over all positive-negative pairs.
    # a: positives .7 .5 .6 .3 vs negatives .1 .2 .1 .1 .1 .4 -> 6 + 6 + 6 + 5 = 23 of 24 pairs
    # b: positives .7 .3 .6 vs negatives .2 .3 .1 .5 .1 .6 .3 -> 7 + (3 + 2 * 0.5) + (6 + 0.5) = 17.5 of 21
    # c: positives .8 .3 .3 vs negatives .1 .2 .3 .2 .2 .5 .3 -> 7 + 2 * (4 + 2 * 0.5) = 17 of 21
    expected = {"a": 23 / 24, "b": 17.5 / 21, "c": 17 / 21}
    for name, value in expected.items():
        assert scores["per_class"][name]["auroc"] == pytest.approx(value, abs=1e-6)
    assert scores["macro_auroc"] == pytest.approx(np.mean(list(expected.values())), abs=1e-6)


def test_log_loss_is_mean_negative_log_probability_of_the_true_class(scores: dict) -> None:
    p_true = [0.7, 0.5, 0.6, 0.3, 0.7, 0.3, 0.6, 0.8, 0.3, 0.3]  # PROBS[i, TARGETS[i]]
    assert scores["log_loss"] == pytest.approx(-np.mean(np.log(p_true)))


def test_log_loss_clips_a_zero_probability_at_1e_minus_7() -> None:
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    # the first image gives its true class 1 probability 0 -> clipped to 1e-7, a finite -log(1e-7) = 16.118
    assert metrics.log_loss(probs, np.array([1, 0])) == pytest.approx((-np.log(1e-7) - np.log(0.5)) / 2)


def test_ece_is_the_sample_weighted_gap_between_confidence_and_accuracy() -> None:
    # 15 bins of width 1/15. Two images at confidence 0.9 (bin [0.867, 0.933)), one right: |0.5 - 0.9| = 0.4.
    # Two at 0.5 (bin [0.467, 0.533)), both right: |1.0 - 0.5| = 0.5. Each bin holds half: ECE = 0.2 + 0.25.
    probs = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    targets = np.array([0, 1, 0, 0])
    assert metrics.expected_calibration_error(probs, targets) == pytest.approx(0.45, abs=1e-6)
    assert metrics.classification_scores(probs, targets, NAMES)["ece"] == pytest.approx(0.45, abs=1e-6)


def test_scores_are_plain_json_without_float32_noise(scores: dict) -> None:
    assert json.loads(json.dumps(scores)) == scores
    assert scores["accuracy"] == 0.6  # torchmetrics' float32 0.6000000238 is reported as 0.6


def test_absent_class_is_none_and_left_out_of_macro_averages() -> None:
    # class c never occurs but is predicted once (image 2, a false positive); torchmetrics alone would average
    # in recall 0 and AUROC 0 for it.
    probs = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.2, 0.7, 0.1], [0.4, 0.5, 0.1]])
    targets = np.array([0, 0, 0, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the absent class is handled, not warned about
        scores = metrics.classification_scores(probs, targets, NAMES)
    c = scores["per_class"]["c"]
    assert (c["recall"], c["f1"], c["auroc"], c["support"]) == (None, None, None, 0)
    assert c["precision"] == 0.0  # its one prediction was wrong
    assert scores["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 2) / 2, abs=1e-6)  # over a and b only
    # a: positives .7 .6 .2 vs negatives .2 .4 -> 2 + 2 + 0.5 = 4.5 of 6; b: positives .7 .5 vs .2 .3 .3 -> 6 of 6
    assert scores["macro_auroc"] == pytest.approx((4.5 / 6 + 1.0) / 2, abs=1e-6)
    assert json.dumps(scores)  # None, not NaN, so strict JSON readers accept it


def test_numpy_helpers_equal_torchmetrics() -> None:
    probs, targets = random_predictions(300, 7, seed=1)
    probs_t, targets_t = torch.from_numpy(probs), torch.from_numpy(targets)
    assert metrics.accuracy(probs, targets) == pytest.approx(
        float(multiclass_accuracy(probs_t, targets_t, 7, average="micro")), abs=1e-6
    )
    assert metrics.balanced_accuracy(probs, targets) == pytest.approx(
        float(multiclass_recall(probs_t, targets_t, 7, average="macro")), abs=1e-6
    )
    scores = metrics.classification_scores(probs, targets, CLASS_NAMES)
    assert scores["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy(probs, targets), abs=1e-6)


@pytest.mark.parametrize(
    ("probs", "targets"),
    [
        (np.array([[2.0, -1.0], [0.5, 0.1]]), np.array([0, 1])),  # logits
        (np.array([[0.5, 0.5]]), np.array([2])),  # target out of range
        (np.array([[0.5, 0.5]]), np.array([0, 1])),  # length mismatch
        (np.array([[0.5, 0.5]]), np.array([0.0])),  # float targets
    ],
)
def test_invalid_inputs_raise_clear_errors(probs: np.ndarray, targets: np.ndarray) -> None:
    with pytest.raises(ValueError):
        metrics.classification_scores(probs, targets, ["x", "y"])


# ----------------------------------------------------------------------------- operating points


def test_sensitivity_specificity_at_argmax() -> None:
    # positive class c (index 2): argmax flags images 5 (t1) and 7 (t2) -> TP 1 of 3 positives, FP 1 of 7 negatives
    result = metrics.sensitivity_specificity(PROBS, TARGETS, positive=2)
    assert result["sensitivity"] == pytest.approx(1 / 3, abs=1e-6)
    assert result["specificity"] == pytest.approx(6 / 7, abs=1e-6)
    assert result["threshold"] is None


def test_sensitivity_specificity_at_a_threshold_is_inclusive() -> None:
    # p_c >= 0.3 flags images 2 .3, 5 .5, 6 .3, 7 .8, 8 .3, 9 .3: all 3 positives, 3 of 7 negatives (2, 5, 6).
    # The scores exactly at 0.3 count as flagged; torchmetrics' own binary threshold (>) would drop them.
    result = metrics.sensitivity_specificity(PROBS, TARGETS, positive=2, threshold=0.3)
    assert result == {"sensitivity": 1.0, "specificity": pytest.approx(4 / 7, abs=1e-6), "threshold": 0.3}


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # class a's positives score .7 .6 .5 .3: keeping k of 4 needs threshold = k-th largest score
        (0.95, 0.3),  # k = 4
        (0.75, 0.5),  # exactly 3/4: k = 3, no round-off slip to 4
        (0.7, 0.5),  # k = ceil(2.8) = 3
        (0.5, 0.6),  # k = 2
        (0.25, 0.7),  # k = 1
    ],
)
def test_threshold_for_sensitivity_picks_the_largest_qualifying_score(target: float, expected: float) -> None:
    threshold = metrics.threshold_for_sensitivity(PROBS, TARGETS, positive=0, target_sensitivity=target)
    assert threshold == expected
    assert metrics.sensitivity_specificity(PROBS, TARGETS, 0, threshold)["sensitivity"] >= target
    next_up = np.nextafter(threshold, 1.0)
    assert metrics.sensitivity_specificity(PROBS, TARGETS, 0, next_up)["sensitivity"] < target


def test_threshold_for_sensitivity_is_not_moved_by_an_ensemble_score_just_above_one() -> None:
    # Issue 10's reproduction: the weighted mean of ensemble_weights=[.299, .396, .379] gave one saturated melanoma
    # image the score 1.0000000000000002 (round-off of the weighted sum). torchmetrics' binary_roc then took every
    # score for a logit and applied a sigmoid, so the 95%-sensitivity threshold came out as sigmoid(0.224) = 0.556
    # instead of 0.224, and applied to the real scores it caught 11 of 25 melanomas (0.44) instead of 24 (0.96).
    just_above_one = np.nextafter(1.0, 2.0)
    positives = np.array(
        [just_above_one, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.68, 0.65, 0.62, 0.6, *np.linspace(0.5, 0.224, 13), 0.1]
    )  # 24 of 25 at >= 0.224: the threshold for 0.95
    negatives = np.linspace(0.0, 0.5, 25)
    mel_scores = np.concatenate([positives, negatives])
    ensemble = combine.average_probs([np.stack([mel_scores, 1.0 - mel_scores], axis=1)] * 3, [0.299, 0.396, 0.379])
    ensemble[0] = [just_above_one, 1.0 - just_above_one]  # the saturated row as the weighted mean rounded it
    targets = np.array([0] * 25 + [1] * 25)
    assert ensemble.max() > 1.0  # the reproduction holds: one score above 1

    threshold = metrics.threshold_for_sensitivity(ensemble, targets, positive=0, target_sensitivity=0.95)
    assert threshold == pytest.approx(0.224, abs=1e-12)  # not sigmoid(0.224) = 0.5558
    assert metrics.sensitivity_specificity(ensemble, targets, 0, threshold)["sensitivity"] == pytest.approx(0.96)


def test_threshold_for_sensitivity_without_positives_raises() -> None:
    with pytest.raises(ValueError, match="No samples of the positive class"):
        metrics.threshold_for_sensitivity(PROBS[:4], TARGETS[:4], positive=2)


# ----------------------------------------------------------------------------- temperature scaling


def test_temperature_softens_overconfident_predictions() -> None:
    probs, targets = calibrated_predictions(2000, 3, seed=2)
    overconfident = combine.apply_temperature(probs, 0.5)  # logits doubled: the fitted T should undo it
    temperature = metrics.fit_temperature(overconfident, targets)
    assert temperature == pytest.approx(2.0, rel=0.15)
    calibrated = combine.apply_temperature(overconfident, temperature)
    assert metrics.log_loss(calibrated, targets) < metrics.log_loss(overconfident, targets)
    ece = metrics.expected_calibration_error
    assert ece(calibrated, targets) < ece(overconfident, targets)
    assert np.array_equal(calibrated.argmax(axis=1), overconfident.argmax(axis=1))  # accuracy untouched


def test_temperature_is_near_one_for_calibrated_predictions_and_one_is_identity() -> None:
    probs, targets = calibrated_predictions(2000, 3, seed=3)
    assert metrics.fit_temperature(probs, targets) == pytest.approx(1.0, abs=0.15)
    np.testing.assert_allclose(combine.apply_temperature(probs, 1.0), probs, atol=1e-12)


# ----------------------------------------------------------------------------- per-class calibration

# HAM10000's class counts (akiec, bcc, bkl, df, mel, nv, vasc) as frequencies
HAM_PRIOR = np.array([327, 514, 1099, 115, 1113, 6705, 142]) / 10015


def exact_posteriors(n: int, seed: int, separation: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from the HAM10000 prior and features x ~ N(separation * onehot(y), I): the exact posterior
    softmax(separation * x + log prior) is calibrated per class by construction."""
    rng = np.random.default_rng(seed)
    targets = rng.choice(len(HAM_PRIOR), size=n, p=HAM_PRIOR)
    features = rng.normal(size=(n, len(HAM_PRIOR))) + separation * np.eye(len(HAM_PRIOR))[targets]
    logits = separation * features + np.log(HAM_PRIOR)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True), targets


def test_classwise_ece_and_brier_match_hand_values() -> None:
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    targets = np.array([0, 1, 1, 1])
    # class 0: P 0.9 on two images, one of them class 0 (gap 0.4), P 0.1 on two, none class 0 (gap 0.1): 0.25; class
    # 1 mirrors it; the top-label view sees confidence 0.9 against accuracy 0.75 everywhere: 0.15
    assert metrics.classwise_calibration_error(probs, targets) == pytest.approx(0.25, abs=1e-6)
    assert metrics.expected_calibration_error(probs, targets) == pytest.approx(0.15, abs=1e-6)
    assert metrics.brier_score(probs, targets) == pytest.approx((3 * 2 * 0.01 + 2 * 0.81) / 4)
    figures = metrics.classification_scores(probs, targets, ["a", "b"])
    assert (figures["classwise_ece"], figures["brier"]) == (
        metrics.classwise_calibration_error(probs, targets),
        metrics.brier_score(probs, targets),
    )
    assert set(metrics.calibration_figures(probs, targets)) == {"ece", "classwise_ece", "log_loss", "brier"}


def test_scaling_with_one_over_t_and_no_bias_is_the_temperature() -> None:
    probs, _ = random_predictions(50, 4, seed=5)
    np.testing.assert_allclose(
        combine.apply_scaling(probs, np.full(4, 1 / 1.7), np.zeros(4)), combine.apply_temperature(probs, 1.7)
    )
    with pytest.raises(ValueError, match="positive scales"):
        combine.apply_scaling(probs, [1.0, 1.0, 0.0, 1.0], [0.0] * 4)


def test_a_logit_adjusted_row_shows_probabilities_calibrated_per_class_and_decides_with_the_adjusted_ones() -> None:
    """Issue 23: one temperature cannot undo the per-class -tau log prior shift. With exactly calibrated posteriors
    under the HAM10000 prior, the temperature alone shows a mean P(df) near 0.1 for a frequency near 0.01; the
    display calibration chosen on validation shows the class mix, per class as calibrated as the plain model."""
    val_probs, val_targets = exact_posteriors(1500, seed=1)
    probs, targets = exact_posteriors(10000, seed=2)
    tau = 1.0
    adjusted_val = combine.adjust_logits(val_probs, HAM_PRIOR, tau)
    adjusted = combine.adjust_logits(probs, HAM_PRIOR, tau)
    df = 3
    frequency = np.mean(targets == df)

    plain_shown = metrics.fit_display_calibration(val_probs, val_targets, seed=0)
    plain = combine.apply_scaling(probs, plain_shown.scale, plain_shown.bias)
    today = combine.apply_temperature(adjusted, metrics.fit_temperature(adjusted_val, val_targets))
    assert today[:, df].mean() > 4 * frequency  # the issue measured 0.110 against 0.012
    cw_ece = metrics.classwise_calibration_error
    assert cw_ece(today, targets) > cw_ece(plain, targets) + 0.04

    fitted = metrics.fit_display_calibration(adjusted_val, val_targets, offset=tau * np.log(HAM_PRIOR), seed=0)
    # chosen by the cross-validated validation log loss: the undo (or a fitted bias, nearly the same here)
    assert fitted.method in ("prior-undo+temperature", "bias+temperature")
    assert fitted.validation_log_loss[fitted.method] < fitted.validation_log_loss["temperature"] - 0.1
    shown = combine.apply_scaling(adjusted, fitted.scale, fitted.bias)
    assert abs(cw_ece(shown, targets) - cw_ece(plain, targets)) < 0.02  # the done-when
    np.testing.assert_allclose(shown.mean(axis=0), np.bincount(targets, minlength=7) / len(targets), atol=0.015)
    assert metrics.log_loss(shown, targets) < metrics.log_loss(today, targets) - 0.2
    assert metrics.brier_score(shown, targets) < metrics.brier_score(today, targets)
    # the decision stays the adjusted one (better balanced accuracy); the shown top class often differs from it
    assert metrics.balanced_accuracy(adjusted, targets) > metrics.balanced_accuracy(probs, targets) + 0.05
    assert np.mean(shown.argmax(axis=1) != adjusted.argmax(axis=1)) > 0.05


def test_without_a_known_adjustment_a_bias_per_class_is_learnt_on_validation() -> None:
    """A model trained with class weights (here a posterior divided by the square root of the prior) shifts every
    class's probability too, with no tau on record: the per-class bias is fitted from validation alone."""
    val_probs, val_targets = exact_posteriors(1500, seed=3)
    probs, targets = exact_posteriors(10000, seed=4)
    weighted_val = combine.adjust_logits(val_probs, HAM_PRIOR, 0.5)
    weighted = combine.adjust_logits(probs, HAM_PRIOR, 0.5)
    fitted = metrics.fit_display_calibration(weighted_val, val_targets, seed=0)
    assert fitted.method in ("bias+temperature", "vector")
    assert "prior-undo+temperature" not in fitted.validation_log_loss  # nothing on record to undo
    shown = combine.apply_scaling(weighted, fitted.scale, fitted.bias)
    cw_ece = metrics.classwise_calibration_error
    assert cw_ece(shown, targets) < 0.5 * cw_ece(combine.apply_temperature(weighted, fitted.scale[0] ** -1), targets)
    assert cw_ece(shown, targets) < cw_ece(probs, targets) + 0.02


def test_too_few_validation_images_are_not_cross_validated_and_keep_the_undo_or_the_temperature() -> None:
    val_probs, val_targets = exact_posteriors(150, seed=5)
    plain = metrics.fit_display_calibration(val_probs, val_targets)
    assert (plain.method, plain.validation_log_loss) == ("temperature", {}) and not any(plain.bias)
    offset = 1.0 * np.log(HAM_PRIOR)
    undo = metrics.fit_display_calibration(combine.adjust_logits(val_probs, HAM_PRIOR, 1.0), val_targets, offset)
    assert undo.method == "prior-undo+temperature"
    np.testing.assert_allclose(np.asarray(undo.bias) / np.asarray(undo.scale), offset)
    zero = metrics.fit_display_calibration(val_probs, val_targets, offset=np.zeros(7))  # tau 0: nothing to undo
    assert zero.method == "temperature"


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_the_estimate_and_is_deterministic() -> None:
    probs, targets = random_predictions(500, 7, seed=4)
    low, high = metrics.bootstrap_ci(probs, targets, metrics.balanced_accuracy, n_boot=300, seed=0)
    assert low < metrics.balanced_accuracy(probs, targets) < high
    assert metrics.bootstrap_ci(probs, targets, metrics.balanced_accuracy, n_boot=300, seed=0) == (low, high)
    assert metrics.bootstrap_ci(probs, targets, metrics.balanced_accuracy, n_boot=300, seed=1) != (low, high)


def test_bootstrap_ci_narrows_with_more_data() -> None:
    probs, targets = random_predictions(4000, 7, seed=5)
    small = metrics.bootstrap_ci(probs[:250], targets[:250], metrics.accuracy, n_boot=300)
    large = metrics.bootstrap_ci(probs, targets, metrics.accuracy, n_boot=300)
    assert large[1] - large[0] < (small[1] - small[0]) / 2  # width ~ 1/sqrt(n): 16x the data, ~1/4 the width


def _clustered_predictions(
    n_lesions: int, images_per_lesion: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All images of a lesion right or all wrong together (the extreme of correlated images): probs, targets, ids."""
    rng = np.random.default_rng(seed)
    lesion_right = rng.random(n_lesions) < 0.7
    right = np.repeat(lesion_right, images_per_lesion)
    probs = np.where(right[:, None], [0.8, 0.2], [0.2, 0.8])
    lesion_ids = np.repeat([f"HAM_{i:07d}" for i in range(n_lesions)], images_per_lesion)
    return probs, np.zeros(len(probs), dtype=np.int64), lesion_ids


def test_bootstrap_over_lesions_is_wider_than_over_images_when_images_of_a_lesion_agree() -> None:
    # 40 lesions of 8 images: only 40 independent outcomes, so the interval must be ~sqrt(8) = 2.8x the image one.
    probs, targets, lesion_ids = _clustered_predictions(40, 8, seed=11)
    low_img, high_img = metrics.bootstrap_ci(probs, targets, metrics.accuracy, n_boot=500, seed=0)
    low_les, high_les = metrics.bootstrap_ci(probs, targets, metrics.accuracy, n_boot=500, seed=0, groups=lesion_ids)
    assert low_les < metrics.accuracy(probs, targets) < high_les
    assert high_les - low_les > 2 * (high_img - low_img)


def test_bootstrap_over_one_image_lesions_equals_the_image_bootstrap() -> None:
    # With one image per lesion, lesion k (numbered by first appearance, whatever the ids sort as) is image k, so the
    # same seed draws the very same resamples.
    probs, targets = random_predictions(300, 7, seed=12)
    shuffled_ids = [f"HAM_{i:07d}" for i in np.random.default_rng(12).permutation(300)]
    by_image = metrics.bootstrap_ci(probs, targets, metrics.balanced_accuracy, n_boot=200, seed=3)
    by_lesion = metrics.bootstrap_ci(probs, targets, metrics.balanced_accuracy, n_boot=200, seed=3, groups=shuffled_ids)
    assert by_lesion == by_image


def test_bootstrap_over_lesions_draws_whole_lesions() -> None:
    # Lesions of 1, 2 and 3 images, interleaved; each image's own index is hidden in its class-0 probability.
    lesion_ids = np.array(["a", "b", "c", "b", "c", "c", "d"])
    n_images = len(lesion_ids)
    probs = np.stack([np.arange(n_images) / 10, 1 - np.arange(n_images) / 10], axis=1)
    targets = np.zeros(n_images, dtype=np.int64)
    seen: list[np.ndarray] = []

    def record(drawn_probs: np.ndarray, drawn_targets: np.ndarray) -> float:
        seen.append(np.rint(drawn_probs[:, 0] * 10).astype(np.int64))
        return 0.0

    metrics.bootstrap_ci(probs, targets, record, n_boot=50, seed=0, groups=lesion_ids)
    for drawn in seen:
        counts = np.bincount(drawn, minlength=n_images)
        for lesion in set(lesion_ids):
            in_lesion = counts[lesion_ids == lesion]
            assert len(set(in_lesion)) == 1  # every image of a lesion drawn as often as the lesion
        assert sum(counts[lesion_ids == lesion][0] for lesion in set(lesion_ids)) == 4  # 4 lesions drawn per resample


def test_bootstrap_needs_one_group_per_image() -> None:
    probs, targets = random_predictions(10, 3, seed=13)
    with pytest.raises(ValueError, match="one cluster id per image"):
        metrics.bootstrap_ci(probs, targets, metrics.accuracy, groups=["HAM_1"] * 9)


# ----------------------------------------------------------------------------- ensembles


def test_average_probs_equals_the_hand_average_and_normalises_weights() -> None:
    a, b = np.array([[0.8, 0.2], [0.4, 0.6]]), np.array([[0.2, 0.8], [0.0, 1.0]])
    np.testing.assert_allclose(combine.average_probs([a, b]), [[0.5, 0.5], [0.2, 0.8]])
    # weights 1:3 -> 0.25 a + 0.75 b, however they are scaled
    expected = [[0.35, 0.65], [0.1, 0.9]]
    np.testing.assert_allclose(combine.average_probs([a, b], [1, 3]), expected)
    np.testing.assert_allclose(combine.average_probs([a, b], [0.5, 1.5]), expected)


@pytest.mark.parametrize(
    ("members", "weights"),
    [
        ([np.full((2, 3), 1 / 3), np.full((3, 3), 1 / 3)], None),  # different N
        ([np.full((2, 3), 1 / 3), np.full((2, 2), 1 / 2)], None),  # different K
        ([np.full(3, 1 / 3)], None),  # not (N, K)
        ([], None),
        ([np.full((2, 3), 1 / 3)] * 2, [1.0]),  # one weight for two members
        ([np.full((2, 3), 1 / 3)] * 2, [1.0, -1.0]),
    ],
)
def test_average_probs_rejects_mismatched_inputs(members: list[np.ndarray], weights: list[float] | None) -> None:
    with pytest.raises(ValueError):
        combine.average_probs(members, weights)


def test_fit_ensemble_weights_matches_the_hand_optimum() -> None:
    # True-class probabilities: A gives 0.9 and 0.1, B 0.3 and 0.6. With weight w on A the log loss is
    # -(ln(0.3 + 0.6 w) + ln(0.6 - 0.5 w)) / 2; its derivative 0.6 / (0.3 + 0.6 w) = 0.5 / (0.6 - 0.5 w) gives w = 0.35.
    member_a = np.array([[0.9, 0.1], [0.9, 0.1]])
    member_b = np.array([[0.3, 0.7], [0.4, 0.6]])
    weights = metrics.fit_ensemble_weights([member_a, member_b], np.array([0, 1]))
    np.testing.assert_allclose(weights, [0.35, 0.65], atol=1e-5)


def test_fit_ensemble_weights_zeroes_useless_members_and_beats_every_fixed_mix(
    complementary: tuple[dict[str, np.ndarray], np.ndarray],
) -> None:
    members, targets = complementary  # wrong, uniform, B, A: only A and B carry information, symmetrically
    weights = metrics.fit_ensemble_weights(list(members.values()), targets)
    assert weights.sum() == pytest.approx(1.0) and (weights >= 0).all()
    assert dict(zip(members, weights.round(4), strict=True)) == {"wrong": 0.0, "uniform": 0.0, "B": 0.5, "A": 0.5}
    fitted = metrics.log_loss(combine.average_probs(list(members.values()), weights), targets)
    for mix in ([1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 2, 2], [0, 0, 1, 2]):
        assert fitted <= metrics.log_loss(combine.average_probs(list(members.values()), mix), targets) + 1e-9


def test_fit_ensemble_weights_of_one_member_is_one_and_mismatches_raise() -> None:
    probs, targets = random_predictions(20, 3, seed=14)
    assert metrics.fit_ensemble_weights([probs], targets).tolist() == [1.0]
    with pytest.raises(ValueError):
        metrics.fit_ensemble_weights([probs, probs[:10]], targets)
    with pytest.raises(ValueError, match="No ensemble members"):
        metrics.fit_ensemble_weights([], targets)


def _member(correct: list[bool], targets: np.ndarray) -> np.ndarray:
    """0.8 on the true class where ``correct``; else 0.5 on the next class, 0.3 on the true one, 0.2 on the last."""
    probs = np.empty((len(targets), 3))
    for i, (ok, t) in enumerate(zip(correct, targets, strict=True)):
        row = np.array([0.1, 0.1, 0.1]) if ok else np.array([0.2, 0.2, 0.2])
        row[t] = 0.8 if ok else 0.3
        if not ok:
            row[(t + 1) % 3] = 0.5
        probs[i] = row
    return probs


@pytest.fixture
def complementary() -> tuple[dict[str, np.ndarray], np.ndarray]:
    # A is right on images 0-3, B on 2-5: each alone scores balanced accuracy 2/3 (the tie goes to A by name), and
    # averaged they are right everywhere (e.g. image 0: true class (0.8 + 0.3) / 2 = 0.55 > (0.1 + 0.5) / 2).
    # "uniform" adds the same 1/3 to every class, so it never changes the argmax and only blurs the log loss;
    # "wrong" is confidently wrong on every image.
    targets = np.array([0, 1, 2, 0, 1, 2])
    members = {
        "wrong": _member([False] * 6, targets),
        "uniform": np.full((6, 3), 1 / 3),
        "B": _member([False, False, True, True, True, True], targets),
        "A": _member([True, True, True, True, False, False], targets),
    }
    return members, targets


@pytest.mark.parametrize("metric", ["balanced_accuracy", "log_loss"])
def test_greedy_selection_combines_complementary_members_and_skips_useless_ones(
    complementary: tuple[dict[str, np.ndarray], np.ndarray], metric: str
) -> None:
    # log loss: A alone (4 ln 0.8 + 2 ln 0.3) / -6 = 0.550; A + B (4 ln 0.55 + 2 ln 0.8) / -6 = 0.473;
    # adding uniform to A + B: (4 ln 0.478 + 2 ln 0.644) / -6 = 0.639, worse.
    members, targets = complementary
    assert metrics.greedy_selection(members, targets, metric=metric) == ["A", "B"]


def test_greedy_selection_respects_max_members_and_breaks_ties_by_name(
    complementary: tuple[dict[str, np.ndarray], np.ndarray],
) -> None:
    members, targets = complementary
    assert metrics.greedy_selection(members, targets, max_members=1) == ["A"]
    renamed = {"Z" if k == "A" else k: v for k, v in members.items()}  # now B comes first among the tied pair
    assert metrics.greedy_selection(renamed, targets) == ["B", "Z"]
    with pytest.raises(ValueError, match="Unknown selection metric"):
        metrics.greedy_selection(members, targets, metric="auroc")


# ----------------------------------------------------------------------------- official ISIC 2018 scorer

ISIC_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")  # Task 3 file order, unlike CLASS_NAMES


def _isic_frame(values: np.ndarray, images: list[str]) -> pd.DataFrame:
    """Our (N, 7) columns reordered and renamed into an ISIC 2018 Task 3 table with an ``image`` column."""
    order = [CLASS_NAMES.index(name.lower()) for name in ISIC_COLUMNS]
    return pd.DataFrame(values[:, order], columns=list(ISIC_COLUMNS)).assign(image=images)[["image", *ISIC_COLUMNS]]


@pytest.mark.filterwarnings("ignore:.*deprecated and will be removed")  # the scorer's pandas 1.x idioms
def test_balanced_accuracy_and_auroc_agree_with_the_official_isic_scorer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("isic_challenge_scoring")
    from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore

    # isic-challenge-scoring 5.6.0 still calls DataFrame.applymap, which pandas 3 removed (renamed to map).
    if not hasattr(pd.DataFrame, "applymap"):
        monkeypatch.setattr(pd.DataFrame, "applymap", pd.DataFrame.map, raising=False)
    probs, targets = random_predictions(200, 7, seed=7)
    images = [f"ISIC_{i:07d}" for i in np.random.default_rng(7).permutation(200)]  # scorer sorts rows by name
    _isic_frame(np.eye(7)[targets], images).to_csv(truth := tmp_path / "truth.csv", index=False)
    _isic_frame(probs, images).to_csv(pred := tmp_path / "pred.csv", index=False)

    # What `isic-challenge-scoring classification truth.csv pred.csv` runs (its default metric).
    official = ClassificationScore.from_file(truth, pred, ClassificationMetric.BALANCED_ACCURACY)
    ours = metrics.classification_scores(probs, targets, CLASS_NAMES)

    assert ours["balanced_accuracy"] == pytest.approx(official.overall, abs=1e-6)
    assert ours["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy(probs, targets), abs=1e-6)
    for name in CLASS_NAMES:
        official_auc = official.per_category.at[name.upper(), "auc"]
        assert ours["per_class"][name]["auroc"] == pytest.approx(official_auc, abs=1e-6), name
    assert ours["macro_auroc"] == pytest.approx(official.macro_average["auc"], abs=1e-6)


def test_absent_class_is_averaged_like_the_isic_metric_functions() -> None:
    # The full scorer cannot score a truth file missing a class (its partial AUC raises), so compare with the
    # metric functions it is built from: NaN for the absent class, then pandas' NaN-skipping mean.
    isic_metrics = pytest.importorskip("isic_challenge_scoring.metrics")
    probs, targets = random_predictions(200, 7, seed=8)
    targets[targets == CLASS_NAMES.index("df")] = CLASS_NAMES.index("nv")
    images = [f"ISIC_{i:07d}" for i in range(200)]
    truth = _isic_frame(np.eye(7)[targets], images).set_index("image")
    pred = _isic_frame(probs, images).set_index("image")
    weights = pd.Series(1.0, index=truth.index)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(ROC AUC score is not defined|positive samples).*")
        isic_balanced = isic_metrics.balanced_multiclass_accuracy(truth, pred, weights)
        isic_auc = pd.Series({c: isic_metrics.auc(truth[c], pred[c], weights) for c in ISIC_COLUMNS})

    ours = metrics.classification_scores(probs, targets, CLASS_NAMES)
    assert ours["balanced_accuracy"] == pytest.approx(isic_balanced, abs=1e-6)
    assert np.isnan(isic_auc["DF"]) and ours["per_class"]["df"]["auroc"] is None
    assert ours["macro_auroc"] == pytest.approx(isic_auc.mean(), abs=1e-6)


# ----------------------------------------------------------------------------- plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path, min_side: int = 300, max_side: int = 1200) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert all(min_side <= side <= max_side for side in image.size), image.size


def test_plots_write_small_valid_pngs(tmp_path: Path) -> None:
    probs, targets = random_predictions(150, 7, seed=9)
    scores = metrics.classification_scores(probs, targets, CLASS_NAMES)
    cm = np.asarray(scores["confusion_matrix"])
    written = [
        plots.plot_confusion_matrix(cm, CLASS_NAMES, tmp_path / "cm_counts.png", normalize=False),
        plots.plot_confusion_matrix(cm, CLASS_NAMES, tmp_path / "cm_norm.png", normalize=True),
        plots.plot_roc_curves(probs, targets, CLASS_NAMES, tmp_path / "roc.png"),
        plots.plot_reliability_diagram(probs, targets, tmp_path / "nested" / "reliability.png"),
        plots.plot_reliability_diagram(
            probs, targets, tmp_path / "reliability_both.png", calibrated=combine.apply_temperature(probs, 1.5)
        ),
    ]
    for path in written:
        assert isinstance(path, Path)
        _assert_png(path)


def test_plots_cope_with_an_absent_class_and_leave_no_open_figures(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    probs, targets = random_predictions(60, 3, seed=10)
    targets[targets == 2] = 0
    cm = np.asarray(metrics.classification_scores(probs, targets, NAMES)["confusion_matrix"])  # row c is all zero
    _assert_png(plots.plot_confusion_matrix(cm, NAMES, tmp_path / "cm.png", normalize=True))
    _assert_png(plots.plot_roc_curves(probs, targets, NAMES, tmp_path / "roc.png"))
    assert plt.get_fignums() == []


def test_posthoc_logit_adjustment_recovers_rare_classes_and_tau_zero_changes_nothing() -> None:
    rng = np.random.default_rng(0)
    prior = np.array([0.8, 0.2])
    targets = np.array([0] * 50 + [1] * 50)
    # a classifier biased towards the frequent class by log(prior): p ~ softmax(signal + log prior)
    signal = np.where(targets[:, None] == np.arange(2), 1.0, 0.0) + rng.normal(0, 0.6, (100, 2))
    logits = signal + np.log(prior)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(combine.adjust_logits(probs, prior, 0.0), probs, atol=1e-9)
    tau = metrics.fit_logit_adjustment(probs, targets, prior)
    assert tau > 0.5
    adjusted = combine.adjust_logits(probs, prior, tau)
    assert metrics.balanced_accuracy(adjusted, targets) > metrics.balanced_accuracy(probs, targets)
    with pytest.raises(ValueError, match="positive class frequencies"):
        combine.adjust_logits(probs, [1.0, 0.0], 1.0)
