"""What every metric of the package takes, checked once, and the one way arrays reach torchmetrics.

Functions take softmax *probabilities* ``probs (N, K)``, not logits, and integer ``targets (N,)``, so single models
and ensembles are treated alike. Every array reaches torchmetrics through :func:`to_tensor`, which clips scores to
[0, 1]: torchmetrics applies a sigmoid or softmax to *all* scores as soon as one lies outside [0, 1], and a weighted
ensemble mean can reach 1.0000000000000002. Its results come back as JSON-ready floats through :func:`plain_float`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

Metric = Callable[[np.ndarray, np.ndarray], float]  # (probs, targets) -> a score: what bootstrap_ci resamples


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


def to_tensor(values: np.ndarray) -> torch.Tensor:
    """The one way arrays reach torchmetrics: labels and decisions as int64, scores as float64 clipped to [0, 1].

    torchmetrics re-applies a sigmoid/softmax to every score once any lies outside [0, 1]; round-off of a (weighted)
    mean or of float32 (1.0000000000000002, 1.0000001) must not trigger that, so scores are clipped here.
    """
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_:
        return torch.from_numpy(values.astype(np.int64))
    return torch.from_numpy(np.clip(values, 0.0, 1.0).astype(np.float64))


def to_tensors(probs: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and labels for one torchmetrics call (see :func:`to_tensor`)."""
    return to_tensor(probs), to_tensor(targets)


def plain_float(value: float | torch.Tensor) -> float:
    """JSON-ready float of a torchmetrics result, which is float32 even for float64 inputs: keep only the digits
    float32 holds (0.6, not 0.6000000238418579), so reports neither show nor diff on round-off noise."""
    return float(str(np.float32(value)))


def none_where(values: torch.Tensor, undefined: np.ndarray) -> list[float | None]:
    """Plain floats, ``None`` where the metric is undefined."""
    return [None if bad else plain_float(v) for v, bad in zip(values.tolist(), undefined, strict=True)]


def mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None
