"""Build the embedded sample (lesionnet/data/sample): whole lesions per class drawn from a full HAM10000 copy.

    python scripts/make_sample.py --src ../shared/data/ham10000_200x150 --dest lesionnet/data/sample

Whole lesions are taken (all their images) so the sample supports a lesion-level split. A maintainer's script, not
a ``lesionnet`` command: the package only reads the sample (``lesionnet.data.metadata.embedded_sample_root``).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from lesionnet.data.metadata import METADATA_FILE, embedded_sample_root, load_ham10000

ATTRIBUTION = """# Embedded HAM10000 sample

A small real sample of HAM10000 ({n_images} images, {n_lesions} lesions, about {per_class} images per
class), used when `data.root` is not set so that `python train.py` runs on a fresh clone. It is for
smoke runs and demos only: train on the full set for any reported figure.

Dataset: "The HAM10000 dataset, a large collection of multi-source dermatoscopic images of common
pigmented skin lesions" (Tschandl, Rosendahl, Kittler, 2018), Harvard Dataverse, DOI 10.7910/DVN/DBW86T.
Licence: CC BY-NC 4.0 (Attribution-NonCommercial), as stated by the dataset authors.
Cite: Tschandl P., Rosendahl C. & Kittler H. Sci. Data 5, 180161 (2018), doi:10.1038/sdata.2018.161.

Made with `python scripts/make_sample.py --src {src_name} --per-class {per_class} --seed {seed}`
from a {src_name} copy (images as published there, metadata rows unchanged).
"""


def choose_lesions(df: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    """Random whole lesions per class until each class has at least ``per_class`` images (or runs out)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for _, group in df.groupby("dx", sort=True):
        lesions = rng.permutation(group["lesion_id"].unique())
        sizes = group.groupby("lesion_id").size()
        n = int(np.searchsorted(np.cumsum(sizes[lesions].to_numpy()), per_class) + 1)
        chosen.extend(lesions[:n])
    return df[df["lesion_id"].isin(chosen)]


def make_sample(src: Path, dest: Path, per_class: int = 40, seed: int = 0) -> pd.DataFrame:
    full = load_ham10000(src, check_headers=False)
    sample = choose_lesions(full, per_class, seed)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    for path in sample["path"]:
        shutil.copyfile(path, dest / "images" / Path(path).name)
    columns = [c for c in full.columns if c not in ("path", "csv_line")]
    sample[columns].to_csv(dest / METADATA_FILE, index=False)
    (dest / "SOURCE.md").write_text(
        ATTRIBUTION.format(
            n_images=len(sample),
            n_lesions=sample["lesion_id"].nunique(),
            per_class=per_class,
            src_name=src.name,
            seed=seed,
        )
    )
    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True, help="a full HAM10000 folder")
    parser.add_argument("--dest", type=Path, default=embedded_sample_root())
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sample = make_sample(args.src, args.dest, args.per_class, args.seed)
    print(f"{len(sample)} images, {sample['lesion_id'].nunique()} lesions -> {args.dest}")
    print(sample["dx"].value_counts().sort_index().to_string())


if __name__ == "__main__":
    main()
