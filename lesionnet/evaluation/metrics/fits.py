"""What is fitted on validation data and then applied to the evaluated set: the temperature, the calibration of the
shown probabilities, the logit adjustment's tau, the ensemble's weights and its members (greedy selection). Applying
them (ensemble mean, logit adjustment, temperature, scaling) is ``lesionnet.inference.decision.combine``'s, the one
implementation the app serves with."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax, softmax

from lesionnet.contract.scores import DisplayCalibration, DisplayMethod
from lesionnet.evaluation.metrics.classification import LOG_LOSS_EPS, accuracy, balanced_accuracy, log_loss
from lesionnet.evaluation.metrics.inputs import Metric, check_inputs
from lesionnet.inference.decision.combine import adjust_logits, apply_scaling, as_logits

TEMPERATURE_BOUNDS = (0.05, 20.0)  # T > 1 softens, T < 1 sharpens


def _nll_at(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    return float(-np.mean(log_softmax(logits / temperature, axis=1)[np.arange(len(targets)), targets]))


def fit_temperature(probs: np.ndarray, targets: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """Temperature T > 0 minimising the NLL of softmax(log p / T): T > 1 softens over-confident predictions.

    Optimised over log T within ``bounds``, so the search is symmetric in sharpening and softening; uninformative
    predictions run to the upper bound (the flattest allowed). Fit on validation data, apply to test.
    """
    probs, targets = check_inputs(probs, targets)
    logits = as_logits(probs)
    result = minimize_scalar(
        lambda log_t: _nll_at(logits, targets, math.exp(log_t)),
        bounds=(math.log(bounds[0]), math.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(math.exp(result.x))


DISPLAY_CV_FOLDS = 5
DISPLAY_CV_MIN_IMAGES = 200  # fewer validation images: no cross-validation, the fewest-parameter family is taken
DISPLAY_BIAS_PENALTY = 1e-4  # L2 on the biases: finite for a class a training fold lacks, and mean-zero


def _scaling_nll(
    params: np.ndarray, logits: np.ndarray, onehot: np.ndarray, per_class_scale: bool
) -> tuple[float, np.ndarray]:
    """Mean NLL of softmax(a * logits + b) (+ the bias penalty) and its gradient in params = (a, b); a is one scale
    or one per class. Convex: the logits are linear in (a, b)."""
    k = logits.shape[1]
    scale, bias = (params[:k], params[k:]) if per_class_scale else (params[:1], params[1:])
    shifted = logits * scale + bias
    shifted -= shifted.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    residual = (np.exp(log_probs) - onehot) / len(logits)
    grad_scale = (residual * logits).sum(axis=0) if per_class_scale else np.array([(residual * logits).sum()])
    grad_bias = residual.sum(axis=0) + 2 * DISPLAY_BIAS_PENALTY * bias
    loss = float(-(log_probs * onehot).sum() / len(logits) + DISPLAY_BIAS_PENALTY * (bias**2).sum())
    return loss, np.concatenate([grad_scale, grad_bias])


def _fit_scaling(logits: np.ndarray, targets: np.ndarray, per_class_scale: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale, bias) per class minimising the NLL of softmax(scale * logits + bias), scales within the temperature
    bounds (as 1/T)."""
    k = logits.shape[1]
    n_scales = k if per_class_scale else 1
    onehot = np.eye(k)[targets]
    low, high = 1.0 / TEMPERATURE_BOUNDS[1], 1.0 / TEMPERATURE_BOUNDS[0]
    result = minimize(
        _scaling_nll,
        x0=np.concatenate([np.ones(n_scales), np.zeros(k)]),
        args=(logits, onehot, per_class_scale),
        jac=True,
        method="L-BFGS-B",
        bounds=[(low, high)] * n_scales + [(None, None)] * k,
        options={"maxiter": 1000},
    )
    scale = result.x[:n_scales]
    return (scale if per_class_scale else np.full(k, scale[0])), result.x[n_scales:]


def _fit_display(
    probs: np.ndarray, targets: np.ndarray, method: DisplayMethod, offset: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(scale, bias) of one family fitted on (probs, targets): see :class:`DisplayCalibration`."""
    k = probs.shape[1]
    if method == "temperature":
        return np.full(k, 1.0 / fit_temperature(probs, targets)), np.zeros(k)
    if method == "prior-undo+temperature":
        if offset is None:
            raise ValueError("prior-undo+temperature needs the row's logit adjustment (tau * log prior) to undo")
        undone = softmax(as_logits(probs) + offset, axis=1)
        temperature = fit_temperature(undone, targets)
        return np.full(k, 1.0 / temperature), offset / temperature
    return _fit_scaling(as_logits(probs), targets, per_class_scale=method == "vector")


def validation_folds(targets: np.ndarray, groups: np.ndarray | None, n_folds: int, seed: int) -> np.ndarray:
    """A fold per image, stratified by class, keeping the images of one group (lesion) in one fold."""
    units = np.arange(len(targets)) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    n_units = int(units.max()) + 1
    unit_class = np.zeros(n_units, dtype=np.int64)
    unit_class[units] = targets  # a lesion has one diagnosis
    order = np.lexsort((np.random.default_rng(seed).random(n_units), unit_class))
    fold_of_unit = np.empty(n_units, dtype=np.int64)
    fold_of_unit[order] = np.arange(n_units) % n_folds
    return fold_of_unit[units]


def fit_display_calibration(
    probs: np.ndarray,
    targets: np.ndarray,
    offset: Sequence[float] | np.ndarray | None = None,
    groups: np.ndarray | None = None,
    seed: int = 0,
    n_folds: int = DISPLAY_CV_FOLDS,
) -> DisplayCalibration:
    """How to show a row's probabilities (softmax(scale * log p + bias)), chosen and fitted on validation data.

    Candidates, simplest first: ``temperature``; ``prior-undo+temperature`` when the row's probabilities carry a
    logit adjustment, ``offset`` = tau * log prior per class (post-hoc or trained), which is added back before the
    temperature; ``bias+temperature``; ``vector``. Each is scored by its log loss on held-out folds of the validation
    data (``n_folds``, stratified, a lesion's images in one fold when ``groups`` are given); the lowest wins (ties go
    to the simpler) and is refitted on all of it. With fewer than ``DISPLAY_CV_MIN_IMAGES`` images nothing is
    cross-validated: the undo (when there is an offset) or the temperature alone.
    """
    probs, targets = check_inputs(probs, targets)
    k = probs.shape[1]
    offset_array = None if offset is None else np.asarray(offset, dtype=np.float64)
    if offset_array is not None and offset_array.shape != (k,):
        raise ValueError(f"offset needs one value per class ({k}), got {offset}")
    if offset_array is not None and np.allclose(offset_array, offset_array[0]):
        offset_array = None  # a constant shift changes no probability: nothing to undo
    candidates: list[DisplayMethod] = ["temperature"]
    if offset_array is not None:
        candidates.append("prior-undo+temperature")
    candidates += ["bias+temperature", "vector"]
    cv_loss: dict[str, float] = {}
    if len(targets) < DISPLAY_CV_MIN_IMAGES:
        method = candidates[1] if offset_array is not None else candidates[0]
    else:
        folds = validation_folds(targets, groups, n_folds, seed)
        for candidate in candidates:
            held_out = np.empty_like(probs)
            for fold in range(n_folds):
                test = folds == fold
                scale, bias = _fit_display(probs[~test], targets[~test], candidate, offset_array)
                held_out[test] = apply_scaling(probs[test], scale, bias)
            cv_loss[candidate] = log_loss(held_out, targets)
        method = min(candidates, key=lambda name: (round(cv_loss[name], 9), candidates.index(name)))
    scale, bias = _fit_display(probs, targets, method, offset_array)
    return DisplayCalibration(
        method=method, scale=[float(a) for a in scale], bias=[float(b) for b in bias], validation_log_loss=cv_loss
    )


LOGIT_ADJUSTMENT_GRID: tuple[float, ...] = tuple(np.round(np.arange(0.0, 2.01, 0.1), 2))


def fit_logit_adjustment(
    probs: np.ndarray, targets: np.ndarray, prior: Sequence[float], grid: Sequence[float] = LOGIT_ADJUSTMENT_GRID
) -> float:
    """The tau of :func:`adjust_logits` with the best balanced accuracy on (validation) data; ties go to the
    smaller tau, the smaller change."""
    probs, targets = check_inputs(probs, targets)
    scores = [balanced_accuracy(adjust_logits(probs, prior, tau), targets) for tau in grid]
    return float(grid[int(np.argmax(scores))])


def _true_class_probs(members: Sequence[np.ndarray], targets: np.ndarray) -> np.ndarray:
    """(N, members) probability each member gives each image's true class: all that the log loss of a mix sees."""
    rows = np.arange(len(targets))
    return np.stack([check_inputs(member, targets)[0][rows, targets] for member in members], axis=1)


def fit_ensemble_weights(members: Sequence[np.ndarray], targets: np.ndarray, prune_below: float = 1e-4) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the log loss of the weighted mean of ``members``.

    Fit on validation data instead of typing weights by hand: the log loss of a mixture is convex in its weights,
    so SLSQP on the simplex finds the global optimum, and a member that adds nothing gets weight 0. Weights under
    ``prune_below`` are set to 0 (and the rest renormalised): they move no probability by more than that, yet
    would cost a forward pass at serving time.
    """
    if len(members) == 0:
        raise ValueError("No ensemble members to weight")
    targets = np.asarray(targets)
    true_probs = _true_class_probs(members, targets)
    n_members = true_probs.shape[1]
    if n_members == 1:
        return np.ones(1)

    def loss_and_gradient(weights: np.ndarray) -> tuple[float, np.ndarray]:
        mixed = np.clip(true_probs @ weights, LOG_LOSS_EPS, None)  # as log_loss clips, so the optimum is its optimum
        return float(-np.mean(np.log(mixed))), -(true_probs / mixed[:, None]).mean(axis=0)

    result = minimize(
        loss_and_gradient,
        x0=np.full(n_members, 1.0 / n_members),
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * n_members,
        constraints=[{"type": "eq", "fun": lambda weights: weights.sum() - 1.0, "jac": lambda _: np.ones(n_members)}],
        options={"ftol": 1e-12, "maxiter": 500},
    )
    if not result.success:
        raise RuntimeError(f"Fitting ensemble weights did not converge ({result.message}); use ensemble=mean.")
    weights = np.clip(result.x, 0.0, None)
    weights[weights < prune_below] = 0.0
    return weights / weights.sum()


# Selection metrics: (function, higher is better).
SELECTION_METRICS: dict[str, tuple[Metric, bool]] = {
    "accuracy": (accuracy, True),
    "balanced_accuracy": (balanced_accuracy, True),
    "log_loss": (log_loss, False),
}


def greedy_selection(
    members: Mapping[str, np.ndarray],
    targets: np.ndarray,
    metric: str = "balanced_accuracy",
    max_members: int | None = None,
) -> list[str]:
    """Caruana-style forward selection without replacement, on validation data.

    Start from the best single member, then repeatedly add the member whose inclusion most improves the metric of
    the uniform probability average; stop when no addition strictly improves it or at ``max_members``. Candidates
    are scanned in name order and only a strictly better score replaces the incumbent, so ties go to the first name.
    """
    if metric not in SELECTION_METRICS:
        raise ValueError(f"Unknown selection metric {metric!r}; choose from {sorted(SELECTION_METRICS)}")
    if not members:
        raise ValueError("No ensemble members to select from")
    fn, higher_is_better = SELECTION_METRICS[metric]
    sign = 1.0 if higher_is_better else -1.0
    targets = np.asarray(targets)
    for probs in members.values():
        check_inputs(probs, targets)
    limit = len(members) if max_members is None else max_members
    if limit < 1:
        raise ValueError(f"max_members must be >= 1, got {max_members}")

    chosen: list[str] = []
    total = np.zeros_like(next(iter(members.values())), dtype=np.float64)
    best_score = -math.inf
    while len(chosen) < limit:
        candidate, candidate_score = None, best_score
        for name in sorted(set(members) - set(chosen)):
            score = sign * fn((total + members[name]) / (len(chosen) + 1), targets)
            if score > candidate_score + 1e-12:
                candidate, candidate_score = name, score
        if candidate is None:
            break
        chosen.append(candidate)
        total += members[candidate]
        best_score = candidate_score
    return chosen
