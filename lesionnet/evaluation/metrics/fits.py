"""What is fitted on validation data and then applied to the evaluated set: the temperature, the logit adjustment's
tau, the ensemble's weights and its members (greedy selection). Applying them (ensemble mean, logit adjustment,
temperature) is ``lesionnet.inference.decision.combine``'s, the one implementation the app serves with."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax

from lesionnet.evaluation.metrics.classification import LOG_LOSS_EPS, accuracy, balanced_accuracy, log_loss
from lesionnet.evaluation.metrics.inputs import Metric, check_inputs
from lesionnet.inference.decision.combine import adjust_logits, as_logits


def _nll_at(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    return float(-np.mean(log_softmax(logits / temperature, axis=1)[np.arange(len(targets)), targets]))


def fit_temperature(probs: np.ndarray, targets: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
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
