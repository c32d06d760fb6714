"""Evaluation metrics on predicted probabilities: pure functions of ``probs (N, K)`` and ``targets (N,)``.

Everything torchmetrics provides (accuracy, per-class/macro precision, recall, F1, AUROC, ROC, calibration error,
confusion matrix) comes from torchmetrics; numpy/scipy cover the rest (log loss, the fits of the temperature, the
logit adjustment and the ensemble weights, bootstrap). Applying what is fitted (ensemble mean, logit adjustment,
temperature) is ``lesionnet.inference.decision.combine``'s, the one implementation the app serves with. Functions
take softmax *probabilities*, not logits, so single models and ensembles are treated alike. Every array reaches
torchmetrics through :func:`_tensor`, which clips scores to [0, 1]: torchmetrics applies a sigmoid or softmax to *all*
scores as soon as one lies outside [0, 1], and a weighted ensemble mean can reach 1.0000000000000002.

Macro averages run over the classes present in ``targets``, which is what the official ISIC 2018 Task 3 scorer
(``isic-challenge-scoring``) does: its balanced accuracy and per-class AUC are NaN for an absent class and pandas'
``mean`` skips them. torchmetrics' own macro averages differ there (an absent class that is predicted counts as
recall 0, an absent class's AUROC counts as 0), so macros are taken from its per-class values instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax
from torchmetrics.functional.classification import (
    binary_recall,
    binary_roc,
    binary_specificity,
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
    multiclass_roc,
)

# apply_temperature and average_probs are re-exported for evaluation/runner.py, which calls them as metrics.*: import
# them from lesionnet.inference.decision.combine there and drop them here.
from lesionnet.inference.decision.combine import adjust_logits, apply_temperature, as_logits, average_probs

__all__ = [
    "accuracy",
    "adjust_logits",
    "apply_temperature",
    "average_probs",
    "balanced_accuracy",
    "bootstrap_ci",
    "check_inputs",
    "classification_scores",
    "expected_calibration_error",
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

LOG_LOSS_EPS = 1e-7
ECE_BINS = 15

Metric = Callable[[np.ndarray, np.ndarray], float]


# ----------------------------------------------------------------------------- input handling


def check_inputs(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes, ranges and row sums up front (torchmetrics would silently re-softmax logits); return arrays."""
    probs, targets = np.asarray(probs), np.asarray(targets)
    if probs.ndim != 2 or targets.ndim != 1 or len(probs) != len(targets):
        raise ValueError(f"Expected probs (N, K) and targets (N,), got {probs.shape} and {targets.shape}")
    if len(targets) == 0:
        raise ValueError("No samples to evaluate")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if targets.min() < 0 or targets.max() >= probs.shape[1]:
        raise ValueError(f"targets must lie in [0, {probs.shape[1]}), got [{targets.min()}, {targets.max()}]")
    if not np.all(np.isfinite(probs)) or probs.min() < -1e-6 or probs.max() > 1 + 1e-6:
        raise ValueError("probs must be finite probabilities in [0, 1] (pass softmax outputs, not logits)")
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("Each row of probs must sum to 1 (pass softmax outputs, not logits)")
    return probs, targets


def _tensor(values: np.ndarray) -> torch.Tensor:
    """The one way arrays reach torchmetrics: labels and decisions as int64, scores as float64 clipped to [0, 1].

    torchmetrics re-applies a sigmoid/softmax to every score once any lies outside [0, 1]; round-off of a (weighted)
    mean or of float32 (1.0000000000000002, 1.0000001) must not trigger that, so scores are clipped here.
    """
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_:
        return torch.from_numpy(values.astype(np.int64))
    return torch.from_numpy(np.clip(values, 0.0, 1.0).astype(np.float64))


def _tensors(probs: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and labels for one torchmetrics call (see :func:`_tensor`)."""
    return _tensor(probs), _tensor(targets)


def _plain(value: float | torch.Tensor) -> float:
    """JSON-ready float of a torchmetrics result, which is float32 even for float64 inputs: keep only the digits
    float32 holds (0.6, not 0.6000000238418579), so reports neither show nor diff on round-off noise."""
    return float(str(np.float32(value)))


def _none_where(values: torch.Tensor, undefined: np.ndarray) -> list[float | None]:
    """Plain floats, ``None`` where the metric is undefined."""
    return [None if bad else _plain(v) for v, bad in zip(values.tolist(), undefined, strict=True)]


def _mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


# ----------------------------------------------------------------------------- fast numpy metrics


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


# ----------------------------------------------------------------------------- torchmetrics-based report


def per_class_auroc(probs: np.ndarray, targets: np.ndarray) -> list[float | None]:
    """One-vs-rest AUROC per class; ``None`` for a class with no positives or no negatives (undefined, not 0)."""
    probs, targets = check_inputs(probs, targets)
    num_classes = probs.shape[1]
    support = np.bincount(targets, minlength=num_classes)
    with warnings.catch_warnings():  # torchmetrics warns and scores 0 for such classes; we report None instead
        warnings.filterwarnings("ignore", message=r".*(positive|negative) samples in targets.*")
        values = multiclass_auroc(*_tensors(probs, targets), num_classes=num_classes, average="none")
    return _none_where(values, (support == 0) | (support == len(targets)))


def per_class_roc(probs: np.ndarray, targets: np.ndarray) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """One-vs-rest ROC curve ``(fpr, tpr)`` per class; ``None`` where undefined (see :func:`per_class_auroc`)."""
    probs, targets = check_inputs(probs, targets)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(positive|negative) samples in targets.*")
        fpr, tpr, _ = multiclass_roc(*_tensors(probs, targets), num_classes=probs.shape[1])
    aurocs = per_class_auroc(probs, targets)
    return [None if auc is None else (x.numpy(), y.numpy()) for x, y, auc in zip(fpr, tpr, aurocs, strict=True)]


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE (torchmetrics, L1, equal-width bins): the sample-weighted gap between confidence and accuracy."""
    probs, targets = check_inputs(probs, targets)
    p, t = _tensors(probs, targets)
    return _plain(multiclass_calibration_error(p, t, probs.shape[1], n_bins=n_bins, norm="l1"))


def classification_scores(probs: np.ndarray, targets: np.ndarray, class_names: Sequence[str]) -> dict:
    """All headline metrics as a JSON-serialisable dict (plain floats, lists, ``None`` for undefined values).

    Keys: ``accuracy``, ``balanced_accuracy`` (macro recall), ``macro_f1``, ``macro_auroc``, ``log_loss``, ``ece``
    (top-label, 15 bins, L1), ``per_class`` ({name: {precision, recall, f1, auroc, support}}), ``confusion_matrix``
    (rows = true class) and ``n``.

    A class absent from ``targets`` has ``recall``, ``f1`` and ``auroc`` ``None`` (no positives to score) and is left
    out of the macro averages, as the ISIC scorer does; its ``precision`` is torchmetrics' (0 when anything was
    predicted as it, all false positives; 0 by the zero-division convention otherwise). Decisions are argmax.
    """
    probs, targets = check_inputs(probs, targets)
    num_classes = probs.shape[1]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} probability columns")
    p, t = _tensors(probs, targets)
    support = np.bincount(targets, minlength=num_classes)
    absent = support == 0  # undefined recall/F1/AUROC, left out of the macro averages

    per_class_values = {
        "precision": _none_where(multiclass_precision(p, t, num_classes, average="none"), np.zeros_like(absent)),
        "recall": _none_where(multiclass_recall(p, t, num_classes, average="none"), absent),
        "f1": _none_where(multiclass_f1_score(p, t, num_classes, average="none"), absent),
        "auroc": per_class_auroc(probs, targets),
    }
    per_class = {
        name: {**{key: values[c] for key, values in per_class_values.items()}, "support": int(support[c])}
        for c, name in enumerate(class_names)
    }
    return {
        "n": len(targets),
        "accuracy": _plain(multiclass_accuracy(p, t, num_classes, average="micro")),
        "balanced_accuracy": _mean_defined(per_class_values["recall"]),
        "macro_f1": _mean_defined(per_class_values["f1"]),
        "macro_auroc": _mean_defined(per_class_values["auroc"]),
        "log_loss": log_loss(probs, targets),
        "ece": expected_calibration_error(probs, targets),
        "per_class": per_class,
        "confusion_matrix": multiclass_confusion_matrix(p, t, num_classes).tolist(),
    }


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


# ----------------------------------------------------------------------------- operating points (one-vs-rest)


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
    decided, truth = _tensors(flagged, targets == positive)
    n_pos = int(truth.sum())
    return {
        "sensitivity": _plain(binary_recall(decided, truth)) if n_pos > 0 else None,
        "specificity": _plain(binary_specificity(decided, truth)) if n_pos < len(truth) else None,
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
    _, tpr, thresholds = binary_roc(*_tensors(probs[:, positive], is_pos))
    reached = tpr.numpy() >= target_sensitivity - 1e-12  # tpr = k / n_pos: forgive round-off at exact fractions
    return float(thresholds.numpy()[reached].max())


# ----------------------------------------------------------------------------- calibration


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


# ----------------------------------------------------------------------------- uncertainty


def _cluster_layout(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image indices sorted by cluster, each cluster's first position in that order, its size).

    Clusters are numbered in order of first appearance: when every image is its own cluster, cluster k is image k,
    so the cluster bootstrap draws exactly the resamples the image bootstrap drew for the same seed.
    """
    _, first_seen, codes = np.unique(groups, return_index=True, return_inverse=True)
    rank = np.empty(len(first_seen), dtype=np.int64)
    rank[np.argsort(first_seen, kind="stable")] = np.arange(len(first_seen))
    cluster_of_image = rank[codes.reshape(-1)]
    sizes = np.bincount(cluster_of_image)
    return np.argsort(cluster_of_image, kind="stable"), np.cumsum(sizes) - sizes, sizes


def bootstrap_ci(
    probs: np.ndarray,
    targets: np.ndarray,
    metric: Metric,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: np.ndarray | Sequence[str] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of ``metric``, resampling clusters (e.g. lesions) with replacement.

    Images of one lesion are correlated, so resampling images treats them as independent evidence and gives too
    narrow an interval; with ``groups`` (one cluster id per image) whole clusters are drawn, all their images
    together. ``groups=None`` makes every image its own cluster: the plain image bootstrap, for sets whose lesion
    ids are unknown. All cluster draws are made in one call, so the loop only gathers indices and runs ``metric``;
    use the numpy helpers (:func:`accuracy`, :func:`balanced_accuracy`, :func:`log_loss`) to keep 1000 resamples
    well under a second. Resamples where the metric is NaN (e.g. a class drawn zero times) are ignored.
    """
    probs, targets = check_inputs(probs, targets)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    clusters = np.arange(len(targets)) if groups is None else np.asarray(groups)
    if clusters.shape != targets.shape:
        raise ValueError(f"groups must hold one cluster id per image: {clusters.shape} for {targets.shape} targets")
    order, starts, sizes = _cluster_layout(clusters)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(sizes), size=(n_boot, len(sizes)))
    stats = np.empty(n_boot, dtype=np.float64)
    for resample, drawn in enumerate(draws):
        drawn_sizes = sizes[drawn]
        # positions starts[c], starts[c] + 1, ..., starts[c] + sizes[c] - 1 of every drawn cluster c, in draw order
        offsets = np.arange(drawn_sizes.sum()) - np.repeat(np.cumsum(drawn_sizes) - drawn_sizes, drawn_sizes)
        idx = order[np.repeat(starts[drawn], drawn_sizes) + offsets]
        stats[resample] = metric(probs[idx], targets[idx])
    low, high = np.nanquantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


# ----------------------------------------------------------------------------- ensembles


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
