"""Exploratory data analysis of a HAM10000 folder: one Markdown report (README.md) with tables and small plots.

``lesionnet eda data.root=../shared/data/ham10000_200x150 [out_dir=docs/eda]`` (lesionnet/cli/eda.py)

The table comes from the same DataModule config as train.py, so the split section shows exactly the
split every training run with these ``data.*`` settings uses. Counts are images unless a table says
lesions: one lesion (``lesion_id``) can have several images, and patient fields repeat across them.

Modules: ``common`` (table helpers), ``plots`` (figures), ``stats`` (what reads image files),
``sections`` (metadata and split sections), ``image_sections`` (sizes, colour, sample grid), ``eda_report``
(the README.md that puts them together).
"""

from lesionnet.eda.eda_report import REPORT_FILE, write_eda_report
from lesionnet.eda.image_sections import section_image_stats, section_sample_grid
from lesionnet.eda.sections import (
    DX_TYPE_MEANING,
    leak_check,
    section_age,
    section_categorical,
    section_classes,
    section_images_per_lesion,
    section_localization,
    section_overview,
    section_quality,
    section_split,
)
from lesionnet.eda.stats import channel_stats, duplicate_images, grid_images, image_sizes

__all__ = [
    "DX_TYPE_MEANING",
    "REPORT_FILE",
    "channel_stats",
    "duplicate_images",
    "grid_images",
    "image_sizes",
    "leak_check",
    "section_age",
    "section_categorical",
    "section_classes",
    "section_image_stats",
    "section_images_per_lesion",
    "section_localization",
    "section_overview",
    "section_quality",
    "section_sample_grid",
    "section_split",
    "write_eda_report",
]
