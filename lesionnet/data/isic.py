"""The ISIC 2018 Task 3 format (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``), read and written in one place: one-hot
ground truth in and out, submission CSVs (probabilities) out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lesionnet.data.metadata import DatasetError, preview_items

ISIC_COLUMNS: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")


def is_isic_ground_truth(df: pd.DataFrame) -> bool:
    return {"image", *ISIC_COLUMNS} <= set(df.columns)


def isic_onehot_to_dx(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """``image, dx`` (HAM10000 codes) from ISIC one-hot rows; every row must carry exactly one label."""
    if not is_isic_ground_truth(df):
        raise DatasetError(f"{path} needs columns image,{','.join(ISIC_COLUMNS)}; found {list(df.columns)}.")
    onehot = df[list(ISIC_COLUMNS)].to_numpy(dtype=float)
    bad = ~np.isclose(onehot.sum(axis=1), 1.0) | ~np.isin(onehot, (0.0, 1.0)).all(axis=1)
    if bad.any():
        raise DatasetError(f"{path}: rows {preview_items(np.flatnonzero(bad) + 2)} are not one-hot.")
    return pd.DataFrame({"image": df["image"].to_numpy(), "dx": [ISIC_COLUMNS[i].lower() for i in onehot.argmax(1)]})


def write_isic_predictions(image_ids: Iterable[str], probs: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    """Probabilities as an ISIC 2018 Task 3 submission CSV (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``)."""
    lower = [c.lower() for c in ISIC_COLUMNS]
    if sorted(class_names) != sorted(lower):
        raise ValueError(f"The ISIC 2018 format needs the 7 HAM10000 classes, the model has {list(class_names)}.")
    order = [list(class_names).index(c) for c in lower]
    frame = pd.DataFrame(probs[:, order], columns=list(ISIC_COLUMNS))
    frame.insert(0, "image", list(image_ids))
    frame.to_csv(path, index=False, float_format="%.9f")
    return path


def write_isic_ground_truth(image_ids: Iterable[str], dx: Iterable[str], path: Path) -> Path:
    """Labels as an ISIC 2018 Task 3 ground-truth CSV, so the official scorer can be run on our outputs."""
    frame = pd.DataFrame({"image": list(image_ids)})
    codes = list(dx)  # read once per column below
    for column in ISIC_COLUMNS:
        frame[column] = [1.0 if d == column.lower() else 0.0 for d in codes]
    frame.to_csv(path, index=False)
    return path
