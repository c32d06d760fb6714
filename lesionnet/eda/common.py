"""Table helpers every EDA section shares: class order, Markdown tables, percentages, per-class samples."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from lesionnet.classes import CLASS_NAMES

UNKNOWN = "unknown"


def _classes(table: pd.DataFrame) -> list[str]:
    """Classes present, in the dataset's label order, so every table and plot lists them the same way."""
    present = set(table["dx"])
    return [c for c in CLASS_NAMES if c in present] + sorted(present - set(CLASS_NAMES))


def _md(df: pd.DataFrame, floatfmt: str | Sequence[str] = ".1f") -> str:
    """Markdown table; the index becomes a column so integer columns keep their integer format."""
    return df.reset_index().to_markdown(index=False, intfmt=",", floatfmt=floatfmt)


def _pct(part: pd.Series | pd.DataFrame, whole: pd.Series | float) -> pd.Series | pd.DataFrame:
    return (100 * part / whole).round(1)


def _with_total(df: pd.DataFrame, label: str = "total") -> pd.DataFrame:
    """Append a column-sum row, the number a reader checks first."""
    out = pd.concat([df, df.sum(numeric_only=True).to_frame(label).T.astype(df.dtypes.to_dict())])
    out.index.name = df.index.name
    return out


def _crosstab(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """Images per class (rows) and value of ``column`` (columns); missing values count as 'unknown'."""
    values = table[column].fillna(UNKNOWN).astype(str)
    counts = pd.crosstab(table["dx"], values).reindex(_classes(table), fill_value=0)
    order = sorted(counts.columns, key=lambda v: (v == UNKNOWN, -counts[v].sum(), v))
    counts = counts[order]
    counts.columns.name = None
    counts.index.name = "dx"
    return counts


def _sample_per_class(table: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Up to ``n`` random images per class: bounded cost on the full set, reproducible by seed."""
    parts = [g.sample(n=min(n, len(g)), random_state=seed) for _, g in table.groupby("dx", sort=False)]
    return pd.concat(parts)
