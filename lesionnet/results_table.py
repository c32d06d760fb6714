"""Collect the metrics.json of training runs into the seed-style results table (Markdown and CSV).

``lesionnet report logs/train/multiruns/2026-11-26_10-00-00 [more run or sweep folders] [out_dir=DIR]``
(its one entry point: lesionnet/cli/report.py).
Rows are sorted by the validation metric the runs monitored (``monitor``, val/balanced_acc by default):
ranking by a test metric would be model selection on the test set. Depth is the number of weight layers
(Conv2d and Linear modules) of the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from lesionnet.data.run_folder import RunFolder

DEFAULT_MONITOR = "val/balanced_acc"  # train.yaml's default; metrics.json files older than `monitor` used it
MODES = ("max", "min")
COLUMNS: dict[str, str] = {
    "run": "run",
    "backbone": "model",
    "finetune": "fine-tuning",
    "val_acc": "val acc",
    "test_acc": "test acc",
    "test_balanced_acc": "test balanced acc",
    "test_auroc": "test AUROC",
    "depth": "depth",
    "params_total": "params",
    "params_trainable": "trainable params",
    "epochs": "epochs",
    "wall_min": "wall (min)",
    "monitor": "sorted by",
    "val_monitor": "val (sort key)",
}


def _run_label(run: Path, root: Path) -> str:
    """The run folder relative to the working directory when possible (readable and unique), else to its root."""
    try:
        return str(run.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(run.relative_to(root)) or "."


def _row(path: Path, root: Path, sort_by: str | None, sort_mode: str) -> dict[str, object]:
    metrics = RunFolder(path.parent).metrics()
    model = metrics.model
    monitor = sort_by or metrics.monitor or DEFAULT_MONITOR
    mode = sort_mode if sort_by else metrics.config.get("monitor_mode", "max")
    return {
        "run": _run_label(path.parent, root),
        "backbone": metrics.backbone,
        "finetune": model.get("finetune"),
        "val_acc": metrics.val.get("val/acc"),
        "test_acc": metrics.test.get("test/acc"),
        "test_balanced_acc": metrics.test.get("test/balanced_acc"),
        "test_auroc": metrics.test.get("test/auroc"),
        "depth": model.get("depth"),
        "params_total": model.get("params_total"),
        "params_trainable": model.get("params_trainable"),
        "epochs": metrics.epochs_trained,
        "wall_min": round(metrics.wall_seconds / 60, 1),
        "monitor": monitor,
        "val_monitor": metrics.val.get(monitor),
        "_mode": mode,
    }


def _sort_order(table: pd.DataFrame) -> bool:
    """Whether the sort key ascends: one metric and one direction, or the ranking would compare unlike scores."""
    monitors, modes = sorted(table["monitor"].unique()), sorted(table["_mode"].unique())
    if len(monitors) > 1 or len(modes) > 1:
        rows = zip(table["run"], table["monitor"], table["_mode"], strict=True)
        mixed = ", ".join(f"{run}: {monitor} ({mode})" for run, monitor, mode in rows)
        raise ValueError(
            f"The runs were selected on different validation metrics ({mixed}), so their scores do not rank. "
            "Report them separately, or sort all by one logged metric: sort_by=val/balanced_acc [sort_mode=max]."
        )
    if modes[0] not in MODES:
        raise ValueError(f"monitor_mode must be one of {MODES}, got {modes[0]!r} (in the runs' config or sort_mode).")
    return modes[0] == "min"


def collect(*roots: str | Path, sort_by: str | None = None, sort_mode: str = "max") -> pd.DataFrame:
    """One row per metrics.json under the roots (runs or sweep folders), best validation score first.

    The key is each run's ``monitor`` (what checkpointing selected on) in its ``monitor_mode``, or ``sort_by``
    (a validation metric in every metrics.json) in ``sort_mode``. Runs without the metric go last.
    """
    rows = []
    for root in map(Path, roots):
        files = sorted(root.rglob("metrics.json"))
        if not files:
            raise FileNotFoundError(f"No metrics.json under {root}: give a train.py run or multirun folder.")
        rows += [_row(f, root, sort_by, sort_mode) for f in files]
    table = pd.DataFrame(rows)
    for column in ("depth", "params_total", "params_trainable", "epochs"):
        table[column] = table[column].astype("Int64")  # integers stay integers even with gaps
    ascending = _sort_order(table)
    table = table.sort_values("val_monitor", ascending=ascending, na_position="last", kind="stable")
    return table.drop(columns="_mode").reset_index(drop=True)


def to_markdown(table: pd.DataFrame) -> str:
    shown = table.rename(columns=COLUMNS)
    return shown.to_markdown(index=False, floatfmt=".4f", intfmt=",")


def write_results_table(
    roots: Sequence[str | Path], out: str | Path | None = None, sort_by: str | None = None, sort_mode: str = "max"
) -> pd.DataFrame:
    """Write results.md and results.csv to ``out`` (default: the first root), print the table, return it."""
    if not roots:
        raise ValueError("No run folders given: name train.py run or multirun folders holding metrics.json.")
    table = collect(*roots, sort_by=sort_by, sort_mode=sort_mode)
    out = Path(out) if out else Path(roots[0])
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "results.csv", index=False)
    markdown = to_markdown(table)
    (out / "results.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nWritten: {out / 'results.md'}, {out / 'results.csv'}")
    return table
