"""Lesion-level stratified train/val/test split, saved and re-loadable so runs stay comparable.

HAM10000 has up to six images of one lesion; an image-level split puts near-duplicates on both sides
and inflates test accuracy. Here whole lesions are assigned to splits, per class, so class
proportions are kept (at lesion level) and no lesion_id can appear in two splits.

Cross-validation (``data.folds=K data.fold=i``) keeps that test split and deals the remaining (train+val) lesions
into K folds, stratified by class at lesion level: fold i is run i's "val", the other folds its "train".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from lesionnet.contract.split_file import SPLITS as SPLITS  # the split names: part of split.csv's schema
from lesionnet.contract.split_file import read_split_file, write_split_file
from lesionnet.data.metadata import DatasetError, preview_items


def _check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    unknown = set(fractions) - set(SPLITS)
    if unknown:
        raise ValueError(f"Unknown split name(s) {sorted(unknown)} in split fractions; use {list(SPLITS)}.")
    out = {s: float(fractions.get(s, 0.0)) for s in SPLITS}
    if any(v < 0 for v in out.values()) or out["train"] <= 0:
        raise ValueError(f"Split fractions must be >= 0 with train > 0, got {out}.")
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"Split fractions must sum to 1, got {out} (sum {total:g}).")
    return out


def _allocate(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Lesion counts per split for one class: every split with a positive fraction gets >= 1."""
    active = [s for s in SPLITS if fractions[s] > 0]
    counts = {s: 0 for s in SPLITS}
    for s in active:
        if s != "train":
            counts[s] = max(1, round(n * fractions[s]))
    counts["train"] = n - sum(counts.values())
    return counts


def split_lesions(df: pd.DataFrame, fractions: Mapping[str, float], seed: int) -> pd.Series:
    """Assign every image to a split by its lesion; returns a Series of split names aligned to ``df``.

    Stratified by dx at lesion level with a fixed seed. Raises if a class has too few lesions to put
    at least one in every split with a positive fraction (a split without a class cannot measure it).
    """
    fr = _check_fractions(fractions)
    lesions = df.drop_duplicates("lesion_id")[["lesion_id", "dx"]].sort_values("lesion_id")
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    n_needed = sum(1 for v in fr.values() if v > 0)
    for dx, group in lesions.groupby("dx", sort=True):
        ids = group["lesion_id"].to_numpy()
        if len(ids) < n_needed:
            raise DatasetError(
                f"Class '{dx}' has {len(ids)} lesion(s) but the split needs at least {n_needed} "
                f"(one per split with a positive fraction: {fr}). Add data for '{dx}' or set its fraction "
                "to 0 (e.g. data.split_fractions.test=0)."
            )
        counts = _allocate(len(ids), fr)
        if counts["train"] < 1:
            raise DatasetError(
                f"Class '{dx}' has {len(ids)} lesion(s): too few to leave any for training after val/test "
                f"({counts}). Add data for '{dx}' or lower the val/test fractions."
            )
        ids = rng.permutation(ids)
        start = 0
        for split in SPLITS:
            for lesion in ids[start : start + counts[split]]:
                assignment[lesion] = split
            start += counts[split]
    assigned = df["lesion_id"].map(assignment)
    assert_no_leak(df.assign(split=assigned))
    return assigned


def split_images_legacy(
    df: pd.DataFrame, seed: int, test_fraction: float = 0.1, val_fraction: float = 0.1
) -> pd.Series:
    """The seed project's image-level random split (test = 10% of images, val = 10% of the rest).

    For comparison with the seed's table only: images of one lesion land on both sides, so test
    accuracy is optimistic. On the full set it gives 8,111 / 902 / 1,002 images, as in the seed.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(df))
    n_test = math.ceil(len(df) * test_fraction)
    n_val = math.ceil((len(df) - n_test) * val_fraction)
    split = np.full(len(df), "train", dtype=object)
    split[order[:n_test]] = "test"
    split[order[n_test : n_test + n_val]] = "val"
    return pd.Series(split, index=df.index, name="split")


def lesion_overlap(df: pd.DataFrame, a: str = "train", b: str = "test") -> int:
    """Number of lesions with images in both split ``a`` and split ``b`` (0 for a lesion-level split)."""
    return len(set(df.loc[df["split"] == a, "lesion_id"]) & set(df.loc[df["split"] == b, "lesion_id"]))


def assert_no_leak(df: pd.DataFrame) -> None:
    """Raise if any lesion_id has images in more than one split."""
    per_lesion = df.groupby("lesion_id")["split"].nunique()
    leaked = per_lesion[per_lesion > 1].index
    if len(leaked):
        raise DatasetError(
            f"Split leak: lesion(s) {preview_items(leaked)} have images in more than one split. "
            "Use a lesion-level split (delete the split file to make a new one)."
        )


def check_splits_nonempty(df: pd.DataFrame, required: tuple[str, ...] = SPLITS) -> None:
    """Every required split must hold images, or its metrics would be silently missing."""
    counts = df["split"].value_counts()
    empty = [s for s in required if counts.get(s, 0) == 0]
    if empty:
        raise DatasetError(
            f"Split(s) {empty} are empty (counts: {counts.to_dict()}). Use more data or change "
            "data.split_fractions so every split gets images."
        )


def check_fold_settings(folds: int | None, fold: int | None) -> None:
    """``data.folds`` and ``data.fold`` come together, with K >= 2 and 0 <= fold < K."""
    if folds is None and fold is None:
        return
    if folds is None:
        raise ValueError(
            f"data.fold={fold} needs data.folds=K (the number of cross-validation folds), e.g. data.folds=5."
        )
    if fold is None:
        raise ValueError(
            f"data.folds={folds} needs data.fold=i, the fold this run holds out: one run per fold, "
            f"python train.py -m ... data.folds={folds} 'data.fold=range({folds})'."
        )
    if folds < 2:
        raise ValueError(
            f"data.folds must be >= 2 for cross-validation, got {folds}; or drop data.folds and data.fold."
        )
    if not 0 <= fold < folds:
        raise ValueError(f"data.fold must lie in [0, {folds}) for data.folds={folds}, got {fold}.")


def assign_folds(df: pd.DataFrame, split: pd.Series, folds: int, seed: int) -> pd.Series:
    """Fold number (0..K-1) of every train+val image, by its lesion; <NA> for test images, which no fold touches.

    Per class (at lesion level, with a fixed seed) the lesions are shuffled and dealt round-robin, so each fold gets
    ``n // K`` or ``n // K + 1`` lesions of every class; each class starts dealing where the previous one stopped,
    which also keeps the folds' total lesion counts within one of each other.
    """
    check_fold_settings(folds, 0)
    pool = df.assign(split=split)
    pool = pool[pool["split"] != "test"]
    lesions = pool.drop_duplicates("lesion_id")[["lesion_id", "dx"]].sort_values("lesion_id")
    rng = np.random.default_rng([seed, folds])  # its own stream: the test split's draws stay as they were
    assignment: dict[str, int] = {}
    next_fold = 0
    for dx, group in lesions.groupby("dx", sort=True):
        ids = group["lesion_id"].to_numpy()
        if len(ids) < folds:
            fewer = f"use data.folds={len(ids)} or fewer, or " if len(ids) >= 2 else ""
            raise DatasetError(
                f"Class '{dx}' has {len(ids)} lesion(s) outside the test split, fewer than data.folds={folds}: some "
                f"fold would hold out no '{dx}' lesion to predict. Fix: {fewer}add data for '{dx}'."
            )
        for position, lesion in enumerate(rng.permutation(ids)):
            assignment[lesion] = (next_fold + position) % folds
        next_fold = (next_fold + len(ids)) % folds
    return df["lesion_id"].map(assignment).where(split != "test").astype("Int64").rename("fold")


def fold_split(split: pd.Series, fold_of_image: pd.Series, fold: int) -> pd.Series:
    """Run ``fold``'s split: its fold is "val", the other folds "train", test stays test."""
    held_out = (fold_of_image == fold).fillna(False).astype(bool)
    return split.where(split == "test", held_out.map({True: "val", False: "train"})).rename("split")


def save_split(df: pd.DataFrame, path: str | Path) -> Path:
    """Write image_id, lesion_id, dx, split (and fold, in cross-validation) as split.csv: exactly which images were
    where (the file's format: :mod:`lesionnet.contract.split_file`)."""
    return write_split_file(df, path)


def load_folds(path: str | Path) -> pd.Series:
    """The ``fold`` column of a cross-validation run's split.csv, indexed by image_id (<NA> for test images)."""
    saved = read_split_file(path)
    if "fold" not in saved.columns:
        raise DatasetError(
            f"{path} has no fold column: it was not written by a cross-validation run. Train the folds with "
            "data.folds=K 'data.fold=range(K)'."
        )
    return saved.set_index("image_id")["fold"]


def load_split(df: pd.DataFrame, path: str | Path, allow_leak: bool = False) -> pd.Series:
    """Apply a saved split file to ``df``; it must cover exactly these images and be leak-free.

    ``allow_leak`` accepts an image-level (legacy) split file, for seed-parity runs only. The file itself (columns,
    version, split names, one row per image) is checked by :func:`lesionnet.contract.split_file.read_split_file`.
    """
    path = Path(path)
    mapping = read_split_file(path).set_index("image_id")["split"]
    not_in_file = sorted(set(df["image_id"]) - set(mapping.index))
    not_in_data = sorted(set(mapping.index) - set(df["image_id"]))
    if not_in_file or not_in_data:
        raise DatasetError(
            f"Split file {path} does not match the dataset: {len(not_in_file)} image(s) missing from it "
            f"({preview_items(not_in_file)}), {len(not_in_data)} listed but not in the data "
            f"({preview_items(not_in_data)}). "
            "Use the split file written for this dataset, or drop data.split_file to make a new split."
        )
    split = df["image_id"].map(mapping)
    if not allow_leak:
        assert_no_leak(df.assign(split=split))
    return split
