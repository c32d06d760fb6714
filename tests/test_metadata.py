"""Loading HAM10000 from disk: the valid layouts load, every bad input fails with a message that says what to fix."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lesionnet.data.decode import read_rgb
from lesionnet.data.metadata import DatasetError, load_ham10000
from tests.conftest import write_image

CSV = "HAM10000_metadata.csv"


def _edit_csv(root: Path, edit) -> None:
    df = pd.read_csv(root / CSV)
    edit(df).to_csv(root / CSV, index=False)


def test_loads_every_row_with_its_image_path(ham_dir: Path) -> None:
    df = load_ham10000(ham_dir)
    assert len(df) == 84
    assert df["path"].map(lambda p: Path(p).is_file()).all()
    assert (df["path"].map(lambda p: Path(p).stem) == df["image_id"]).all()


def test_reads_images_split_over_the_two_published_part_folders(make_ham) -> None:
    root = make_ham(folders=("HAM10000_images_part_1", "HAM10000_images_part_2"))
    df = load_ham10000(root)
    assert {Path(p).parent.name for p in df["path"]} == {"HAM10000_images_part_1", "HAM10000_images_part_2"}


def test_missing_folder_names_the_path_and_data_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"Data folder not found.*data\.root"):
        load_ham10000(tmp_path / "nowhere")


def test_missing_metadata_csv_is_named(ham_dir: Path) -> None:
    (ham_dir / CSV).unlink()
    with pytest.raises(DatasetError, match=r"Metadata file not found: .*HAM10000_metadata\.csv"):
        load_ham10000(ham_dir)


def test_missing_columns_are_listed(ham_dir: Path) -> None:
    _edit_csv(ham_dir, lambda df: df.drop(columns=["lesion_id"]))
    with pytest.raises(DatasetError, match=r"lacks column\(s\) \['lesion_id'\]"):
        load_ham10000(ham_dir)


def test_unknown_dx_label_names_label_and_csv_line(ham_dir: Path) -> None:
    def edit(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[3, "dx"] = "melanoma"
        return df

    _edit_csv(ham_dir, edit)
    with pytest.raises(DatasetError, match=r"unknown dx label\(s\) \['melanoma'\] on line\(s\) 5\b"):
        load_ham10000(ham_dir)


def test_image_missing_for_a_row_is_an_error_not_a_skip(ham_dir: Path) -> None:
    df = pd.read_csv(ham_dir / CSV)
    (ham_dir / "images" / f"{df.image_id[10]}.jpg").unlink()
    with pytest.raises(DatasetError, match=rf"1 image\(s\) listed .* {df.image_id[10]} \(CSV line\(s\) 12\)"):
        load_ham10000(ham_dir)


def test_images_not_in_the_csv_are_counted_in_a_warning(ham_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(1)
    for i in range(3):
        write_image(ham_dir / "images" / f"ISIC_99{i}.jpg", rng)
    with caplog.at_level(logging.WARNING):
        df = load_ham10000(ham_dir)
    assert len(df) == 84
    assert "3 image file(s)" in caplog.text and "not listed" in caplog.text


def test_unreadable_image_fails_at_load_with_its_path(ham_dir: Path) -> None:
    victim = sorted((ham_dir / "images").glob("*.jpg"))[5]
    victim.write_bytes(b"this is not a jpeg")
    with pytest.raises(DatasetError, match=rf"Unreadable image .*{victim.name}"):
        load_ham10000(ham_dir)


def test_empty_image_file_fails_at_load(ham_dir: Path) -> None:
    victim = sorted((ham_dir / "images").glob("*.jpg"))[0]
    victim.write_bytes(b"")
    with pytest.raises(DatasetError, match="file is empty"):
        load_ham10000(ham_dir)


def test_truncated_jpeg_passes_header_check_but_fails_at_first_read(ham_dir: Path) -> None:
    victim = sorted((ham_dir / "images").glob("*.jpg"))[7]
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    df = load_ham10000(ham_dir)  # the header is intact
    with pytest.raises(DatasetError, match=rf"Cannot decode image .*{victim.name}"):
        read_rgb(df.loc[df.image_id == victim.stem, "path"].item())


def test_duplicate_image_rows_are_rejected(ham_dir: Path) -> None:
    _edit_csv(ham_dir, lambda df: pd.concat([df, df.iloc[[0]]]))
    with pytest.raises(DatasetError, match="listed more than once"):
        load_ham10000(ham_dir)


def test_lesion_with_two_diagnoses_is_rejected(ham_dir: Path) -> None:
    def edit(df: pd.DataFrame) -> pd.DataFrame:
        lesion = df.lesion_id[df.lesion_id.duplicated()].iloc[0]
        df.loc[df.index[df.lesion_id == lesion][0], "dx"] = (
            "vasc" if df.dx[df.lesion_id == lesion].iloc[0] != "vasc" else "nv"
        )
        return df

    _edit_csv(ham_dir, edit)
    with pytest.raises(DatasetError, match="more than one dx"):
        load_ham10000(ham_dir)


def test_header_only_csv_is_rejected(ham_dir: Path) -> None:
    (ham_dir / CSV).write_text("lesion_id,image_id,dx,dx_type,age,sex,localization\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_ham10000(ham_dir)


def test_no_image_folder_lists_the_expected_names(ham_dir: Path) -> None:
    (ham_dir / "images").rename(ham_dir / "pictures")
    with pytest.raises(DatasetError, match=r"No image folder .*HAM10000_images_part_1"):
        load_ham10000(ham_dir)
