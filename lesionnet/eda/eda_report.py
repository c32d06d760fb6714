"""The EDA report: every section, in reading order, into one README.md beside its PNGs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from lesionnet.eda.image_sections import section_image_stats, section_sample_grid
from lesionnet.eda.sections import (
    _dx_type_note,
    section_age,
    section_categorical,
    section_classes,
    section_images_per_lesion,
    section_localization,
    section_overview,
    section_quality,
    section_split,
)

REPORT_FILE = "README.md"


def write_eda_report(
    table: pd.DataFrame,
    out_dir: Path,
    title: str,
    sample_grid: bool = True,
    *,
    images_per_class: int = 100,
    grid_columns: int = 6,
    seed: int = 0,
    details: Mapping[str, object] | None = None,
) -> Path:
    """Write ``out_dir/README.md`` and its PNGs from a validated table (``load_ham10000`` + optional ``split``).

    Colour statistics read at most ``images_per_class`` images per class so the report stays fast on the
    full set; image sizes come from every header. Returns the Markdown file's path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = [
        section_overview(table, title, details or {}),
        section_quality(table),
        section_classes(table, out_dir),
        section_images_per_lesion(table, out_dir),
        section_age(table, out_dir),
        section_categorical(table, out_dir, "sex", "Sex"),
        section_localization(table, out_dir),
        section_categorical(table, out_dir, "dx_type", "Diagnosis type (dx_type)", note=_dx_type_note(table)),
        section_image_stats(table, images_per_class, seed),
    ]
    if sample_grid:
        sections.append(section_sample_grid(table, out_dir, grid_columns, seed))
    sections.append(section_split(table))
    path = out_dir / REPORT_FILE
    path.write_text("\n\n".join(sections) + "\n")
    return path
