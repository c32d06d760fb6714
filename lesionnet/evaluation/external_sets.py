"""External sets to evaluate on: an image folder, labelled or not (a training run's own split is read by
``lesionnet.data.run_folder``).

Labels come as a CSV ``image_id,dx`` (HAM10000 codes) or in the ISIC 2018 Task 3 ground-truth
format (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`` one-hot). Either may carry a ``lesion_id`` column: it is kept, so the
leak guard refuses a lesion the model trained or was validated on (another image of it is a near-duplicate) and the
confidence intervals resample lesions; a row without one is a lesion of its own. Predictions and ground truth are
written in the ISIC 2018 Task 3 format by ``lesionnet.data.isic``, so the official scorer (``isic-challenge-scoring``)
can check them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from lesionnet.classes import CLASS_NAMES
from lesionnet.data.isic import ISIC_COLUMNS, is_isic_ground_truth, isic_onehot_to_dx
from lesionnet.data.metadata import DatasetError, preview_items

log = logging.getLogger(__name__)
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
LESION_ID = "lesion_id"  # optional labels column: images of one lesion share it


def read_labels(path: str | Path, class_names: Sequence[str] = CLASS_NAMES) -> pd.DataFrame:
    """``image_id, dx`` (and ``lesion_id`` where the file has it) from a HAM10000-style CSV or an ISIC 2018 Task 3
    ground-truth CSV."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"Labels file not found: {path}.")
    df = pd.read_csv(path, dtype={"image_id": str, "image": str, LESION_ID: str})
    if {"image_id", "dx"} <= set(df.columns):
        labels = df[["image_id", "dx"]].copy()
    elif is_isic_ground_truth(df):
        labels = isic_onehot_to_dx(df, path).rename(columns={"image": "image_id"})
    else:
        raise DatasetError(
            f"{path}: unknown labels format (columns {list(df.columns)}). Use a CSV with image_id,dx or the ISIC "
            f"2018 Task 3 ground truth with image,{','.join(ISIC_COLUMNS)}."
        )
    if LESION_ID in df.columns:  # a row without a lesion id is a lesion of its own
        lesions = df[LESION_ID].str.strip()
        labels[LESION_ID] = lesions.where(lesions.fillna("") != "", labels["image_id"]).to_numpy()
    unknown = sorted(set(labels["dx"]) - set(class_names))
    if unknown:
        raise DatasetError(f"{path}: labels {unknown} are not among the model's classes {list(class_names)}.")
    if labels["image_id"].duplicated().any():
        raise DatasetError(
            f"{path}: some images are labelled twice: "
            f"{preview_items(labels.loc[labels['image_id'].duplicated(), 'image_id'])}."
        )
    return labels.reset_index(drop=True)


def folder_images(folder: str | Path) -> pd.DataFrame:
    """Every image file (jpg/jpeg/png) in ``folder`` as ``image_id, path``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"Image folder not found: {folder}.")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DatasetError(f"No .jpg/.jpeg/.png images in {folder}.")
    return pd.DataFrame({"image_id": [p.stem for p in paths], "path": [str(p) for p in paths]})


def external_table(images: str | Path, labels: str | Path | None, class_names: Sequence[str]) -> pd.DataFrame:
    """An external set: every image of the folder, with ``dx`` when a labels file is given."""
    found = folder_images(images)
    if labels is None:
        return found
    labelled = read_labels(labels, class_names)
    table = labelled.merge(found, on="image_id", how="left")
    unlabelled = len(found) - int(found["image_id"].isin(labelled["image_id"]).sum())
    if unlabelled:
        log.info("%d image(s) in %s have no row in %s and are not scored.", unlabelled, images, labels)
    missing = table["path"].isna()
    if missing.any():
        raise DatasetError(
            f"{int(missing.sum())} labelled image(s) have no file in {images}: "
            f"{preview_items(table.loc[missing, 'image_id'])}. Add the images or remove their label rows."
        )
    return table
