"""Read and validate HAM10000 as it ships: a metadata CSV plus one or more image folders.

Every problem is raised (or, for harmless extras, warned) with the file, the rows and the fix,
because a silently dropped image changes the split and therefore every reported figure.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

import pandas as pd
from PIL import Image

from lesionnet.classes import CLASS_NAMES

log = logging.getLogger(__name__)

METADATA_FILE = "HAM10000_metadata.csv"
REQUIRED_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx")
KNOWN_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
IMAGE_DIRS: tuple[str, ...] = ("images", "HAM10000_images_part_1", "HAM10000_images_part_2")
IMAGE_SUFFIX = ".jpg"
GET_DATA_HINT = (
    "Point data.root at a folder holding HAM10000_metadata.csv and the images "
    "(lesionnet download dest=DIR fetches the full set), "
    "or leave data.root unset to use the embedded sample."
)


def embedded_sample_root() -> Path:
    """The small real HAM10000 sample shipped inside the package (the default when data.root is unset)."""
    return Path(str(resources.files("lesionnet.data") / "sample"))


def embedded_sample_images() -> Path:
    """The embedded sample's image folder (export's parity images, the benchmarks' default uploads, tests)."""
    return embedded_sample_root() / IMAGE_DIRS[0]


class DatasetError(ValueError):
    """The dataset on disk does not match what LesionNet needs; the message says how to fix it."""


def preview_items(items: Iterable[object], limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def find_image_dirs(root: Path, image_dirs: Sequence[str] = IMAGE_DIRS) -> list[Path]:
    """The image folders present under ``root``, in the dataset's own layout."""
    return [root / d for d in image_dirs if (root / d).is_dir()]


def index_images(dirs: Sequence[Path]) -> dict[str, Path]:
    """Map image_id -> file over all image folders; an id found twice is an error (which one is right?)."""
    found: dict[str, Path] = {}
    for d in dirs:
        for path in d.glob(f"*{IMAGE_SUFFIX}"):
            if path.stem in found:
                raise DatasetError(
                    f"Image {path.stem} exists twice: {found[path.stem]} and {path}. "
                    "Remove one copy so the image folders hold each image once."
                )
            found[path.stem] = path
    return found


def read_metadata_csv(csv_path: Path, class_names: Sequence[str] = CLASS_NAMES) -> pd.DataFrame:
    """Read the metadata CSV and check columns, labels, duplicate images and one diagnosis per lesion."""
    if not csv_path.is_file():
        raise DatasetError(f"Metadata file not found: {csv_path}. {GET_DATA_HINT}")
    try:
        df = pd.read_csv(csv_path, dtype={"lesion_id": str, "image_id": str, "dx": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DatasetError(f"Cannot parse {csv_path} as CSV ({err}). Restore the original file.") from err
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DatasetError(
            f"{csv_path} lacks column(s) {missing}; found {list(df.columns)}. "
            f"The HAM10000 metadata has columns {list(KNOWN_COLUMNS)}."
        )
    if df.empty:
        raise DatasetError(f"{csv_path} has a header but no rows. Restore the original file.")
    # CSV line numbers (header is line 1) make the messages point at the exact rows to fix.
    df["csv_line"] = df.index + 2
    blank = df[list(REQUIRED_COLUMNS)].isna().any(axis=1)
    if blank.any():
        raise DatasetError(
            f"{csv_path}: empty lesion_id/image_id/dx on line(s) {preview_items(df.loc[blank, 'csv_line'])}. "
            "Fill them in or delete those rows."
        )
    unknown = ~df["dx"].isin(class_names)
    if unknown.any():
        bad = df.loc[unknown]
        raise DatasetError(
            f"{csv_path}: unknown dx label(s) {sorted(bad['dx'].unique())} on line(s) "
            f"{preview_items(bad['csv_line'])}. Valid labels: {list(class_names)}. Fix the labels or delete those rows."
        )
    dup = df["image_id"].duplicated(keep=False)
    if dup.any():
        raise DatasetError(
            f"{csv_path}: image_id listed more than once: {preview_items(sorted(df.loc[dup, 'image_id'].unique()))}. "
            "Keep one row per image."
        )
    dx_per_lesion = df.groupby("lesion_id")["dx"].nunique()
    mixed = dx_per_lesion[dx_per_lesion > 1].index
    if len(mixed):
        raise DatasetError(
            f"{csv_path}: lesion(s) with more than one dx: {preview_items(mixed)}. "
            "Each lesion has one diagnosis; fix those rows."
        )
    return df


def check_image_header(path: Path) -> None:
    """Cheap load-time check (header only); full decoding errors surface at first read."""
    try:
        if path.stat().st_size == 0:
            raise OSError("file is empty")
        with Image.open(path) as img:
            img.size  # noqa: B018 - forces the header parse
    except OSError as err:
        raise DatasetError(
            f"Unreadable image {path}: {err}. Replace it with the original file "
            "(re-download the dataset) or delete its row from the metadata CSV."
        ) from err


def load_ham10000(
    root: str | Path,
    class_names: Sequence[str] = CLASS_NAMES,
    image_dirs: Sequence[str] = IMAGE_DIRS,
    check_headers: bool = True,
) -> pd.DataFrame:
    """Load a HAM10000-layout folder into a validated table with one row per image and its ``path``.

    Raises :class:`DatasetError` for anything that would silently change the data; warns (with a
    count) about image files that no metadata row mentions, since those are simply not used.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"Data folder not found: {root}. {GET_DATA_HINT}")
    csv_path = root / METADATA_FILE
    df = read_metadata_csv(csv_path, class_names)
    dirs = find_image_dirs(root, image_dirs)
    if not dirs:
        raise DatasetError(f"No image folder under {root}: expected one of {list(image_dirs)}. {GET_DATA_HINT}")
    files = index_images(dirs)
    df["path"] = df["image_id"].map(files)
    missing = df["path"].isna()
    if missing.any():
        raise DatasetError(
            f"{int(missing.sum())} image(s) listed in {csv_path} have no file {{image_id}}{IMAGE_SUFFIX} in "
            f"{[str(d) for d in dirs]}: {preview_items(df.loc[missing, 'image_id'])} "
            f"(CSV line(s) {preview_items(df.loc[missing, 'csv_line'])}). "
            "Restore those images or delete their rows from the CSV."
        )
    unlisted = sorted(set(files) - set(df["image_id"]))
    if unlisted:
        log.warning(
            "%d image file(s) under %s are not listed in %s and are not used: %s",
            len(unlisted),
            root,
            csv_path.name,
            preview_items(unlisted),
        )
    if check_headers:
        for path in df["path"]:
            check_image_header(path)
    df["path"] = df["path"].astype(str)
    return df.reset_index(drop=True)
