"""A run's ``split.csv``: which image was in which split (and, in cross-validation, which fold), one writer and one
reader.

Columns: ``image_id``, ``lesion_id``, ``dx``, ``split`` (train / val / test), ``fold`` (cross-validation runs only:
the fold of every train+val image, empty for test images) and ``schema_version`` (the same on every row). A file
written before the version column existed (columns as above, without it) is version 1, the format it has always had.
A file of another version, or one that breaks the format, is refused with its path and the fix.

The reader checks the file by itself (columns, version, split names, one row per image); whether it fits a data set
(every image listed, no lesion in two splits) is checked where it is applied (``lesionnet.data.split.load_split``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lesionnet.contract.files import ContractError, write_text_atomic

SPLIT_FILE_VERSION = 1
READABLE_SPLIT_FILE_VERSIONS: tuple[int, ...] = (SPLIT_FILE_VERSION,)
SPLITS: tuple[str, ...] = ("train", "val", "test")
COLUMNS: tuple[str, ...] = ("image_id", "lesion_id", "dx", "split")  # written; image_id and split required to read
FOLD = "fold"
VERSION = "schema_version"
REQUIRED: tuple[str, ...] = ("image_id", "split")
NEW_SPLIT = (
    "Give the split.csv that train.py wrote for this data (data.split_file=<run>/split.csv), or drop "
    "data.split_file to make a new split."
)


def _preview(values: list[str], limit: int = 5) -> str:
    return ", ".join(values[:limit]) + (f" and {len(values) - limit} more" if len(values) > limit else "")


def write_split_file(table: pd.DataFrame, path: str | Path) -> Path:
    """Write the split of ``table`` (its image_id, lesion_id, dx, split and, when present, fold) at this version.

    Atomic, so a run reading it at the same time never sees half a file; creates the folder."""
    columns = [*COLUMNS, *([FOLD] if FOLD in table.columns else [])]
    missing = sorted(set(columns) - set(table.columns))
    if missing:
        raise ValueError(f"Cannot write a split file without column(s) {missing}; the table has {list(table)}.")
    rows = table[columns].assign(**{VERSION: SPLIT_FILE_VERSION})
    return write_text_atomic(path, rows.to_csv(index=False))


def split_file_version(saved: pd.DataFrame, path: Path) -> int:
    """The version of a read split file: its ``schema_version`` column, or 1 for a file written before it existed."""
    if VERSION not in saved.columns:
        return 1
    found = sorted(set(saved[VERSION].dropna()))
    if len(found) != 1 or not found[0].strip().isdigit():
        raise ContractError(
            f"{path} has the schema_version value(s) {found or ['(empty)']}; a split file has one version on every "
            f"row. {NEW_SPLIT}"
        )
    return int(found[0])


def read_split_file(path: str | Path) -> pd.DataFrame:
    """The rows of a split file, checked: image_id and split as text (lesion_id and dx too when present), fold as
    Int64 (<NA> for test images) when present, no schema_version column. Any problem is a ContractError naming the
    file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ContractError(f"Split file not found: {path}. {NEW_SPLIT}")
    try:
        saved = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as err:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise ContractError(f"Cannot read the split file {path}: {err}. {NEW_SPLIT}") from err
    version = split_file_version(saved, path)
    if version not in READABLE_SPLIT_FILE_VERSIONS:
        raise ContractError(
            f"{path} is a split file of schema version {version} (written by another LesionNet release); this "
            f"LesionNet reads version(s) {list(READABLE_SPLIT_FILE_VERSIONS)}. Use the release that wrote it, or drop "
            "data.split_file to make a new split (and retrain on it)."
        )
    saved = saved.drop(columns=[VERSION], errors="ignore")
    missing = [c for c in REQUIRED if c not in saved.columns]
    if missing:
        raise ContractError(f"Split file {path} lacks column(s) {missing}. {NEW_SPLIT}")
    if saved["image_id"].isna().any():
        raise ContractError(f"Split file {path} has rows without an image_id. {NEW_SPLIT}")
    bad = ~saved["split"].isin(SPLITS)
    if bad.any():
        names = sorted(saved.loc[bad, "split"].fillna("(empty)").unique())
        raise ContractError(f"Split file {path} has unknown split name(s) {names}; use {list(SPLITS)}. {NEW_SPLIT}")
    repeated = saved["image_id"][saved["image_id"].duplicated()]
    if len(repeated):
        raise ContractError(
            f"Split file {path} lists image_id(s) {_preview(sorted(set(repeated)))} more than once. {NEW_SPLIT}"
        )
    if FOLD in saved.columns:
        saved[FOLD] = _folds(saved, path)
    return saved.reset_index(drop=True)


def _folds(saved: pd.DataFrame, path: Path) -> pd.Series:
    """The fold column as Int64: a whole number >= 0 for every train+val image, empty for test images."""
    text = saved[FOLD]
    number = pd.to_numeric(text, errors="coerce")
    whole = number.notna() & (number >= 0) & (number == number.round())
    test = saved["split"] == "test"
    wrong = (text.notna() & ~whole) | (test & text.notna()) | (~test & text.isna())
    if wrong.any():
        raise ContractError(
            f"Split file {path} has fold values that are not whole numbers >= 0 on every train/val image and empty on "
            f"test images (image_id(s) {_preview(saved.loc[wrong, 'image_id'].tolist())}). Retrain the "
            "cross-validation (data.folds=K 'data.fold=range(K)') to write it again."
        )
    return number.astype("Int64").rename(FOLD)
