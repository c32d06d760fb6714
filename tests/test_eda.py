"""The EDA report on the synthetic dataset: its files, its numbers, the leak check, and the Hydra entry point."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from lesionnet.classes import CLASS_NAMES
from lesionnet.data.metadata import load_ham10000
from lesionnet.data.split import split_lesions
from lesionnet.eda import section_image_stats, section_quality, write_eda_report
from tests.conftest import REPO_ROOT, make_ham_dir

CONF = REPO_ROOT / "lesionnet" / "conf"
FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def split_table(root: Path) -> pd.DataFrame:
    table = load_ham10000(root)
    table["split"] = split_lesions(table, FRACTIONS, seed=42)
    return table


def markdown_table(markdown: str, marker: str) -> pd.DataFrame:
    """The first pipe table after ``marker``, as strings indexed by its first column."""
    lines = markdown[markdown.index(marker) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    header, body = rows[0], rows[2:]  # rows[1] is the |---| separator
    return pd.DataFrame(body, columns=header).set_index(header[0])


def as_int(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.apply(lambda col: col.str.replace(",", "").astype(int))


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path, str]:
    """One full report (grid included) shared by the read-only tests below: plotting is the slow part."""
    table = split_table(make_ham_dir(tmp_path_factory.mktemp("ham")))
    path = write_eda_report(table, tmp_path_factory.mktemp("eda"), "Synthetic EDA")
    return table, path, path.read_text()


def test_report_is_readme_and_every_linked_image_is_a_valid_png(report: tuple[pd.DataFrame, Path, str]) -> None:
    _, path, markdown = report
    assert path.name == "README.md" and markdown.startswith("# Synthetic EDA")
    links = IMAGE_LINK.findall(markdown)
    assert {"class_counts.png", "images_per_lesion.png", "age.png", "sample_grid.png"} <= set(links)
    for link in links:
        file = path.parent / link
        assert not Path(link).is_absolute() and file.is_file() and file.stat().st_size > 0, link
        with Image.open(file) as img:
            assert img.format == "PNG"
            img.verify()


def test_class_table_has_the_fixture_image_and_lesion_counts(report: tuple[pd.DataFrame, Path, str]) -> None:
    table, _, markdown = report
    classes = markdown_table(markdown, "## Classes")
    assert list(classes.index) == [*CLASS_NAMES, "total"]
    counts = as_int(classes[["images", "lesions"]])
    assert counts.loc[list(CLASS_NAMES), "images"].to_dict() == table["dx"].value_counts().to_dict()
    assert (counts.loc[list(CLASS_NAMES), "lesions"] == 6).all()
    assert counts.loc["total"].to_dict() == {"images": 84, "lesions": 42}


def test_images_per_lesion_table_matches_the_one_two_three_pattern(report: tuple[pd.DataFrame, Path, str]) -> None:
    dist = as_int(markdown_table(report[2], "## Images per lesion"))
    assert dist.loc[["1", "2", "3"], "lesions"].tolist() == [14, 14, 14]
    assert dist.loc[["1", "2", "3"], "images"].tolist() == [14, 28, 42]
    assert (dist.loc[["1", "2", "3"], list(CLASS_NAMES)] == 2).all().all()
    assert dist.loc["total", ["lesions", "images"]].tolist() == [42, 84]


def test_split_tables_match_the_split_and_the_leak_check_passes(report: tuple[pd.DataFrame, Path, str]) -> None:
    table, _, markdown = report
    images = as_int(markdown_table(markdown, "Images per class and split"))
    expected = pd.crosstab(table["dx"], table["split"])
    for split in ("train", "val", "test"):
        assert images.loc[list(CLASS_NAMES), split].tolist() == expected.loc[list(CLASS_NAMES), split].tolist()
    lesions = as_int(markdown_table(markdown, "Lesions per class and split"))
    assert lesions.loc["total"].to_dict() == {"train": 28, "val": 7, "test": 7, "total": 42}
    assert "**Leak check: passed.**" in markdown


def test_a_leaky_split_is_reported_as_failed(ham_dir: Path, tmp_path: Path) -> None:
    table = split_table(ham_dir)
    lesion = table["lesion_id"].value_counts().index[0]  # a lesion with 3 images
    rows = table.index[table["lesion_id"] == lesion]
    table.loc[rows[0], "split"], table.loc[rows[1], "split"] = "train", "test"
    markdown = write_eda_report(table, tmp_path, "Leaky", sample_grid=False).read_text()
    assert "**Leak check: FAILED.** 1 lesion(s)" in markdown and lesion in markdown
    assert "sample_grid.png" not in markdown


def test_quality_notes_count_missing_values_and_duplicate_files(ham_dir: Path) -> None:
    table = load_ham10000(ham_dir)
    table.loc[[0, 1], ["age", "sex", "localization"]] = [np.nan, "unknown", "unknown"]
    table.loc[2, "age"] = 0.0
    first, other = table.iloc[0], table[table["lesion_id"] != table.iloc[0]["lesion_id"]].iloc[0]
    shutil.copyfile(first["path"], other["path"])  # the same photo filed under two lesions
    notes = section_quality(table)
    assert "age missing: 2 images; age 0: 1 images" in notes
    assert "sex missing or 'unknown': 2 images" in notes
    assert "images with all of age, sex, localization missing or 'unknown': 2" in notes
    assert "1 group(s), 1 spanning more than one lesion" in notes and other["image_id"] in notes


def test_colour_statistics_read_a_bounded_sample_and_say_so(ham_dir: Path) -> None:
    table = load_ham10000(ham_dir)
    section = section_image_stats(table, images_per_class=5, seed=0)
    colour = markdown_table(section, "Per-channel mean")
    assert colour.loc[list(CLASS_NAMES), "images read"].astype(int).tolist() == [5] * 7
    assert "random sample of up to 5 images per class (seed 0; 35 of 84 images)" in section
    assert markdown_table(section, "Image sizes").loc["40x30", "images"] == "84"
    means = colour[["R mean", "G mean", "B mean"]].astype(float)
    assert ((means > 0.4) & (means < 0.6)).all().all()  # uniform random pixels average about 0.5


def test_eda_config_builds_the_same_data_config_as_training() -> None:
    overrides = ["data.root=/some/where", "data.split_seed=7", "data.split_fractions={train:0.6,val:0.2,test:0.2}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        eda = compose("eda", overrides=overrides, return_hydra_config=True)
        train = compose("train", overrides=overrides)
    assert OmegaConf.to_container(eda.data, resolve=True) == OmegaConf.to_container(train.data, resolve=True)
    assert eda.hydra.run.dir.startswith("logs/eda/runs/")  # like train.py's logs/train/runs/...
    assert eda.hydra.job.chdir is False


def test_cli_writes_the_report_with_the_training_split(ham_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eda"
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "lesionnet"),
            "eda",
            f"data.root={ham_dir}",
            f"out_dir={out}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            "sample_grid=false",
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    markdown = (out / "README.md").read_text()
    assert markdown.startswith("# HAM10000 exploratory data analysis")
    assert f"data root: `{ham_dir}`" in markdown and "**Leak check: passed.**" in markdown
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        dm = instantiate(compose("train", overrides=[f"data.root={ham_dir}"]).data)
    expected = dm.split_summary()  # the split exactly as train.py builds it
    images = as_int(markdown_table(markdown, "Images per class and split"))
    assert images.loc[list(CLASS_NAMES), ["train", "val", "test"]].to_numpy().tolist() == expected.to_numpy().tolist()
