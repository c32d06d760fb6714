"""The ISIC 2018 Task 3 label format (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`` one-hot), read in one place."""

from __future__ import annotations

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
