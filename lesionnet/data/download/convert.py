"""ISIC 2018 Task 3 labels to HAM10000_metadata.csv, so the ISIC source gives the layout training reads."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lesionnet.data.isic import isic_onehot_to_dx
from lesionnet.data.metadata import METADATA_FILE, DatasetError


def build_isic_metadata(dest: Path, convert: dict[str, str]) -> None:
    """Write HAM10000_metadata.csv from ISIC 2018's one-hot labels plus its lesion groupings.

    The lesion id is what keeps images of one lesion in one split; without the groupings file a split
    would leak, so a missing lesion id is an error rather than a fallback to one lesion per image.
    """
    gt_path, groups_path = dest / convert["ground_truth"], dest / convert["lesion_groupings"]
    for p in (gt_path, groups_path):
        if not p.is_file():
            raise DatasetError(
                f"{p} is missing after unpacking, so the archives are laid out differently from what the "
                "download config expects: check the target, strip_prefix and convert paths of this source."
            )
    gt, groups = pd.read_csv(gt_path), pd.read_csv(groups_path, dtype=str)
    if not {"image", "lesion_id"} <= set(groups.columns):
        raise DatasetError(f"{groups_path} needs columns image,lesion_id; found {list(groups.columns)}.")
    labels = isic_onehot_to_dx(gt, gt_path)
    merged = labels.merge(groups, on="image", how="left")
    orphans = merged["lesion_id"].isna()
    if orphans.any():
        raise DatasetError(
            f"{int(orphans.sum())} image(s) in {gt_path.name} have no lesion_id in {groups_path.name}: "
            f"{list(merged.loc[orphans, 'image'][:5])}. A lesion-level split needs every lesion id."
        )
    out = pd.DataFrame(
        {
            "lesion_id": merged["lesion_id"],
            "image_id": merged["image"],
            "dx": merged["dx"],
            "dx_type": merged.get("diagnosis_confirm_type", pd.Series("", index=merged.index)),
            "age": "",
            "sex": "",
            "localization": "",
        }
    )
    out.to_csv(dest / METADATA_FILE, index=False)


CONVERTERS = {"isic2018_task3": build_isic_metadata}
