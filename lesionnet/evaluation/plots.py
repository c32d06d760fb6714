"""Evaluation figures (confusion matrix, ROC curves, reliability diagram) written as small PNGs.

Figures are built with matplotlib's object API on an explicit Agg canvas rather than through pyplot: nothing is
registered in pyplot's global figure list (so nothing leaks across calls, the equivalent of always ``plt.close``)
and the process-wide backend is left alone, so these work headless and inside notebooks alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lesionnet.evaluation.metrics import (
    ECE_BINS,
    check_inputs,
    expected_calibration_error,
    per_class_auroc,
    per_class_roc,
    reliability_bins,
)

__all__ = ["plot_confusion_matrix", "plot_reliability_diagram", "plot_roc_curves"]

DPI = 100


def _new_figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(fig)  # attach the raster canvas explicitly: PNG output never depends on the session's backend
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def plot_confusion_matrix(
    cm: np.ndarray | Sequence[Sequence[float]], class_names: Sequence[str], path: str | Path, normalize: bool = False
) -> Path:
    """Heat map with every cell annotated; ``normalize`` divides rows (true classes) so each shows its recall."""
    matrix = np.asarray(cm, dtype=np.float64)
    if normalize:
        row_sums = matrix.sum(axis=1, keepdims=True)
        matrix = np.divide(matrix, row_sums, out=np.zeros_like(matrix), where=row_sums > 0)  # empty rows: 0, not NaN
    fig = _new_figure((6.0, 5.0))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else max(matrix.max(), 1.0))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(len(class_names))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true")
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    ax.set_title("Confusion matrix" + (" (row-normalised)" if normalize else ""))
    threshold = cast(float, image.norm.vmax) / 2  # set by imshow(vmax=...)
    for (i, j), value in np.ndenumerate(matrix):
        text = f"{value:.2f}" if normalize else f"{value:.0f}"
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if value > threshold else "black")
    return _save(fig, path)


def plot_roc_curves(probs: np.ndarray, targets: np.ndarray, class_names: Sequence[str], path: str | Path) -> Path:
    """One-vs-rest ROC curve per class, AUROC in the legend; classes absent from ``targets`` are listed as n/a."""
    curves, aurocs = per_class_roc(probs, targets), per_class_auroc(probs, targets)
    fig = _new_figure((6.0, 5.0))
    ax = fig.subplots()
    for name, curve, auc in zip(class_names, curves, aurocs, strict=True):
        if curve is None:
            ax.plot([], [], label=f"{name} (AUROC n/a)")
        else:
            ax.plot(*curve, linewidth=1.5, label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title("ROC curves (one-vs-rest)")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reliability_diagram(
    probs: np.ndarray,
    targets: np.ndarray,
    path: str | Path,
    n_bins: int = ECE_BINS,
    title: str = "Reliability diagram",
    calibrated: np.ndarray | None = None,
) -> Path:
    """Accuracy against top-label confidence per bin, ECE in the title.

    Pass ``calibrated`` (e.g. after temperature scaling) to overlay it and compare the two ECEs on one figure.
    """
    probs, targets = check_inputs(probs, targets)
    fig = _new_figure((5.0, 5.0))
    ax = fig.subplots()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    _, acc, _ = reliability_bins(probs, targets, n_bins)
    ece = expected_calibration_error(probs, targets, n_bins)
    ax.bar(
        edges[:-1],
        np.nan_to_num(acc),
        width=1.0 / n_bins,
        align="edge",
        edgecolor="black",
        alpha=0.7,
        label=f"model (ECE {ece:.3f})",
    )
    title_ece = f"ECE {ece:.3f}"
    if calibrated is not None:
        calibrated, _ = check_inputs(calibrated, targets)
        conf_after, acc_after, _ = reliability_bins(calibrated, targets, n_bins)
        ece_after = expected_calibration_error(calibrated, targets, n_bins)
        ax.plot(conf_after, acc_after, marker="o", color="tab:orange", label=f"calibrated (ECE {ece_after:.3f})")
        title_ece += f" -> {ece_after:.3f}"
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-label probability)", ylabel="accuracy")
    ax.set_title(f"{title} ({title_ece})")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)
