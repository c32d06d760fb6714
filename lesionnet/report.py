"""Collect the metrics.json of training runs into the seed-style results table (Markdown and CSV).

``python -m lesionnet.report logs/train/multiruns/2026-11-26_10-00-00 [more run or sweep folders] [--out DIR]``
Depth is the number of weight layers (Conv2d and Linear modules) of the network.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

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
}


def _run_label(run: Path, root: Path) -> str:
    """The run folder relative to the working directory when possible (readable and unique), else to its root."""
    try:
        return str(run.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(run.relative_to(root)) or "."


def _row(path: Path, root: Path) -> dict[str, object]:
    m = json.loads(path.read_text())
    model = m.get("model", {})
    return {
        "run": _run_label(path.parent, root),
        "backbone": m["backbone"],
        "finetune": model.get("finetune"),
        "val_acc": m["val"].get("val/acc"),
        "test_acc": m["test"].get("test/acc"),
        "test_balanced_acc": m["test"].get("test/balanced_acc"),
        "test_auroc": m["test"].get("test/auroc"),
        "depth": model.get("depth"),
        "params_total": model.get("params_total"),
        "params_trainable": model.get("params_trainable"),
        "epochs": m.get("epochs_trained"),
        "wall_min": round(m["wall_seconds"] / 60, 1) if "wall_seconds" in m else None,
    }


def collect(*roots: str | Path) -> pd.DataFrame:
    """One row per metrics.json under the roots (runs or sweep folders), sorted by test balanced accuracy."""
    rows = []
    for root in map(Path, roots):
        files = sorted(root.rglob("metrics.json"))
        if not files:
            raise FileNotFoundError(f"No metrics.json under {root}: give a train.py run or multirun folder.")
        rows += [_row(f, root) for f in files]
    table = pd.DataFrame(rows)
    for column in ("depth", "params_total", "params_trainable", "epochs"):
        table[column] = table[column].astype("Int64")  # integers stay integers even with gaps
    return table.sort_values("test_balanced_acc", ascending=False, na_position="last").reset_index(drop=True)


def to_markdown(table: pd.DataFrame) -> str:
    shown = table.rename(columns=COLUMNS)
    return shown.to_markdown(index=False, floatfmt=".4f", intfmt=",")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", type=Path, nargs="+", help="run or multirun folders holding metrics.json files")
    parser.add_argument("--out", type=Path, default=None, help="where to write results.md/.csv (default: first root)")
    args = parser.parse_args(argv)
    table = collect(*args.roots)
    out = args.out or args.roots[0]
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "results.csv", index=False)
    markdown = to_markdown(table)
    (out / "results.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nWritten: {out / 'results.md'}, {out / 'results.csv'}")


if __name__ == "__main__":
    main()
