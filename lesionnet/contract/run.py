"""A train.py run's ``metrics.json``: the typed :class:`RunMetrics`, written and read only here.

The run folder around it (``split.csv``, ``metrics.json``, ``checkpoints/``) is :class:`lesionnet.data.run_folder.
RunFolder`; ``split.csv``'s format is :mod:`lesionnet.contract.split_file`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from lesionnet.contract.files import read_json, write_json

RUN_METRICS_VERSION = 1
RETRAIN = "Re-run train.py with this LesionNet version (or pass the checkpoint file itself where that is enough)."


class RunMetrics(BaseModel):
    """``metrics.json``: what train.py measured for the best checkpoint, and how the run was configured."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = RUN_METRICS_VERSION
    backbone: str
    monitor: str
    model: dict[str, Any]
    best_checkpoint: str
    epochs_trained: int
    fit_seconds: float
    wall_seconds: float
    data_root: str
    data_config: dict[str, Any]
    split_images: dict[str, int]
    fold: int | None = None
    val: dict[str, float]
    test: dict[str, float]
    config: dict[str, Any]


def write_run_metrics(metrics: RunMetrics, path: str | Path) -> Path:
    """Atomically write a run's metrics.json."""
    return write_json(metrics, path)


def read_run_metrics(path: str | Path) -> RunMetrics:
    """A run's metrics.json at this version; any problem is a ContractError naming the file and the fix."""
    return read_json(RunMetrics, path, RUN_METRICS_VERSION, "run metrics file", RETRAIN)
