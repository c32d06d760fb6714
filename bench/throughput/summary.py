"""The rounds of a CPU config summed up: median ratios Lightning/plain, against the target."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

TARGET_RATIO = 0.95


def median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def col(arm: str, part: str) -> list[float]:
        return [r[arm][part]["images_per_s"] for r in rounds]

    train_ratios = [r["train_ratio"] for r in rounds]
    eval_ratios = [r["eval_ratio"] for r in rounds]
    cpu_ratios = [r["train_cpu_ratio"] for r in rounds]
    return {
        "train_ratios": train_ratios,
        "median_train_ratio": median(train_ratios),
        "train_cpu_ratios": cpu_ratios,
        "median_train_cpu_ratio": median(cpu_ratios),
        "eval_ratios": eval_ratios,
        "median_eval_ratio": median(eval_ratios),
        "median_train_images_per_s": {arm: median(col(arm, "train")) for arm in ("lightning", "plain")},
        "median_eval_images_per_s": {arm: median(col(arm, "eval")) for arm in ("lightning", "plain")},
        "median_train_cpu_ms_per_image": {
            arm: median([r[arm]["train"]["cpu_ms_per_image"] for r in rounds]) for arm in ("lightning", "plain")
        },
        "max_rss_mb": {arm: max(r[arm]["max_rss_mb"] for r in rounds) for arm in ("lightning", "plain")},
        "max_rss_mb_after_train": {
            arm: max(r[arm]["max_rss_mb_after_train"] for r in rounds) for arm in ("lightning", "plain")
        },
        "train_meets_target": (median(train_ratios) or 0) >= TARGET_RATIO,
        "eval_meets_target": (median(eval_ratios) or 0) >= TARGET_RATIO,
    }
