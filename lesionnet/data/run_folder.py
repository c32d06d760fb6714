"""A train.py run folder: ``split.csv``, ``metrics.json`` and ``checkpoints/``.

The files' formats are the contract's (``split.csv``: :mod:`lesionnet.contract.split_file`, ``metrics.json``:
:class:`lesionnet.contract.run.RunMetrics`); this class finds them in a folder and applies them to the data, so it
sits in the data layer, above the contract. Everything that needs a run's data root, split or best checkpoint asks
:class:`RunFolder`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lesionnet.contract.files import ContractError
from lesionnet.contract.run import RunMetrics, read_run_metrics, write_run_metrics
from lesionnet.contract.split_file import read_split_file
from lesionnet.data.metadata import load_ham10000
from lesionnet.data.split import load_split


class RunFolder:
    """A train.py run folder; construction checks it is one (``checkpoints/`` or ``split.csv`` inside)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not any(p.exists() for p in (self.path / "checkpoints", self.split_file, self.metrics_file)):
            raise ContractError(
                f"{self.path} is not a train.py run folder (no checkpoints/, split.csv or metrics.json in it)."
            )

    @staticmethod
    def of_checkpoint(checkpoint: Path) -> RunFolder | None:
        """The run a checkpoint sits in (``<run>/checkpoints/x.ckpt`` with a split.csv), else None (a copied file)."""
        run = checkpoint.parent.parent
        if checkpoint.parent.name == "checkpoints" and (run / "split.csv").is_file():
            return RunFolder(run)
        return None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def split_file(self) -> Path:
        return self.path / "split.csv"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    def write_metrics(self, metrics: RunMetrics) -> Path:
        return write_run_metrics(metrics, self.metrics_file)

    def metrics(self) -> RunMetrics:
        return read_run_metrics(self.metrics_file)

    def data_root(self, override: str | Path | None = None) -> Path:
        """The data the run was trained on (``override`` wins: the same data moved elsewhere)."""
        return Path(override) if override else Path(self.metrics().data_root)

    def split_table(self, split: str, data_root: str | Path | None = None) -> pd.DataFrame:
        """Images of one split (train/val/test) as saved in split.csv, with their paths under the data root."""
        table = load_ham10000(self.data_root(data_root))
        table["split"] = load_split(table, self.split_file, allow_leak=True)
        part = table[table["split"] == split].reset_index(drop=True)
        if part.empty:
            raise ContractError(f"Split '{split}' of {self.split_file} is empty; use data.split=test or val.")
        return part

    def split_ids(self, split: str) -> frozenset[str]:
        """Image ids of one split in split.csv (no data needed): to tell whether runs share their splits."""
        table = read_split_file(self.split_file)
        return frozenset(table.loc[table["split"] == split, "image_id"])

    def best_checkpoint(self) -> Path:
        """The checkpoint validation chose (metrics.json), else the only non-last checkpoint."""
        if self.metrics_file.is_file():
            best = Path(self.metrics().best_checkpoint).name
            if best and (self.path / "checkpoints" / best).is_file():
                return self.path / "checkpoints" / best
        candidates = [p for p in sorted((self.path / "checkpoints").glob("*.ckpt")) if p.name != "last.ckpt"]
        if len(candidates) != 1:
            raise ContractError(
                f"Cannot tell the best checkpoint of {self.path}: {len(candidates)} candidates "
                f"({[p.name for p in candidates]}). Give the checkpoint path itself (ckpt=...)."
            )
        return candidates[0]
