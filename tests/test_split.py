"""Lesion-level split: leak-free, stratified, reproducible, saved and reloadable, with clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from lesionnet.contract.files import ContractError
from lesionnet.contract.split_file import SPLIT_FILE_VERSION, read_split_file
from lesionnet.data.metadata import DatasetError, load_ham10000
from lesionnet.data.run_folder import RunFolder
from lesionnet.data.split import (
    SPLITS,
    assert_no_leak,
    check_splits_nonempty,
    lesion_overlap,
    load_split,
    save_split,
    split_images_legacy,
    split_lesions,
)

FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


@pytest.fixture
def table(ham_dir: Path) -> pd.DataFrame:
    return load_ham10000(ham_dir)


def test_no_lesion_appears_in_two_splits(table: pd.DataFrame) -> None:
    split = split_lesions(table, FRACTIONS, seed=0)
    assert (table.assign(split=split).groupby("lesion_id")["split"].nunique() == 1).all()


def test_every_class_is_in_every_split_in_proportion(table: pd.DataFrame) -> None:
    split = split_lesions(table, FRACTIONS, seed=0)
    lesions = table.assign(split=split).drop_duplicates("lesion_id")
    counts = pd.crosstab(lesions["dx"], lesions["split"])
    # 6 lesions per class at 60/20/20 -> 4/1/1 for every class
    assert (counts["train"] == 4).all() and (counts["val"] == 1).all() and (counts["test"] == 1).all()


def test_same_seed_same_split_other_seed_other_split(table: pd.DataFrame) -> None:
    a = split_lesions(table, FRACTIONS, seed=3)
    assert a.equals(split_lesions(table, FRACTIONS, seed=3))
    assert not a.equals(split_lesions(table, FRACTIONS, seed=4))


def test_split_does_not_depend_on_row_order(table: pd.DataFrame) -> None:
    a = table.assign(split=split_lesions(table, FRACTIONS, seed=1)).set_index("image_id")["split"]
    shuffled = table.sample(frac=1.0, random_state=0).reset_index(drop=True)
    b = shuffled.assign(split=split_lesions(shuffled, FRACTIONS, seed=1)).set_index("image_id")["split"]
    assert a.sort_index().equals(b.sort_index())


def test_class_with_too_few_lesions_names_the_class(make_ham) -> None:
    table = load_ham10000(make_ham(lesions_per_class=2))
    with pytest.raises(DatasetError, match=r"Class 'akiec' has 2 lesion\(s\) but the split needs at least 3"):
        split_lesions(table, FRACTIONS, seed=0)


def test_zero_test_fraction_needs_only_two_lesions(make_ham) -> None:
    table = load_ham10000(make_ham(lesions_per_class=2))
    split = split_lesions(table, {"train": 0.5, "val": 0.5, "test": 0.0}, seed=0)
    assert set(split) == {"train", "val"}


@pytest.mark.parametrize(
    "fractions, message",
    [
        ({"train": 0.5, "val": 0.2, "test": 0.2}, "sum to 1"),
        ({"train": 0.8, "valid": 0.2}, "Unknown split name"),
        ({"train": 0.0, "val": 0.5, "test": 0.5}, "train > 0"),
    ],
)
def test_bad_fractions_are_rejected(table: pd.DataFrame, fractions: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_lesions(table, fractions, seed=0)


def test_saved_split_reloads_identically(table: pd.DataFrame, tmp_path: Path) -> None:
    table["split"] = split_lesions(table, FRACTIONS, seed=5)
    path = save_split(table, tmp_path / "run" / "split.csv")
    reloaded = load_split(table.drop(columns="split"), path)
    assert reloaded.equals(table["split"])


def test_split_file_for_other_data_is_rejected(table: pd.DataFrame, tmp_path: Path) -> None:
    table["split"] = split_lesions(table, FRACTIONS, seed=5)
    path = save_split(table.iloc[:-2], tmp_path / "split.csv")
    with pytest.raises(DatasetError, match=r"2 image\(s\) missing from it"):
        load_split(table, path)


def test_leaky_split_file_is_rejected(table: pd.DataFrame, tmp_path: Path) -> None:
    table["split"] = split_lesions(table, FRACTIONS, seed=5)
    multi = table.lesion_id[table.lesion_id.duplicated()].iloc[0]
    rows = table.index[table.lesion_id == multi]
    table.loc[rows[0], "split"] = "train"
    table.loc[rows[1], "split"] = "test"
    path = save_split(table, tmp_path / "split.csv")
    with pytest.raises(DatasetError, match=rf"Split leak: lesion\(s\) {multi}"):
        load_split(table.drop(columns="split"), path)


def test_assert_no_leak_passes_on_clean_split(table: pd.DataFrame) -> None:
    assert_no_leak(table.assign(split=split_lesions(table, FRACTIONS, seed=0)))


def test_empty_split_is_an_error(table: pd.DataFrame) -> None:
    with pytest.raises(DatasetError, match=r"Split\(s\) \['test'\] are empty"):
        check_splits_nonempty(
            table.assign(split="train").assign(split=lambda d: d["split"].where(d.index % 2 == 0, "val")), SPLITS
        )


def test_legacy_split_is_image_level_with_the_seed_proportions(make_ham) -> None:
    table = load_ham10000(make_ham(lesions_per_class=20))  # 140 lesions, 273 images
    split = split_images_legacy(table, seed=0)
    counts = split.value_counts().to_dict()
    assert counts == {"test": 28, "val": 25, "train": 220}  # ceil(10%) then ceil(10% of the rest), as the seed
    assert lesion_overlap(table.assign(split=split), "train", "test") > 0  # the leak it reproduces
    assert split.equals(split_images_legacy(table, seed=0))


def test_legacy_split_file_loads_only_when_leaks_are_allowed(table: pd.DataFrame, tmp_path: Path) -> None:
    table["split"] = split_images_legacy(table, seed=3)
    path = save_split(table, tmp_path / "legacy.csv")
    with pytest.raises(DatasetError, match="Split leak"):
        load_split(table.drop(columns="split"), path)
    assert load_split(table.drop(columns="split"), path, allow_leak=True).equals(table["split"])


def test_a_saved_split_file_carries_its_schema_version_on_every_row(table: pd.DataFrame, tmp_path: Path) -> None:
    table["split"] = split_lesions(table, FRACTIONS, seed=5)
    path = save_split(table, tmp_path / "split.csv")
    saved = pd.read_csv(path)
    assert list(saved.columns) == ["image_id", "lesion_id", "dx", "split", "schema_version"]
    assert (saved["schema_version"] == SPLIT_FILE_VERSION).all()
    assert "schema_version" not in read_split_file(path).columns  # the reader hands over the rows only


def test_a_split_csv_without_a_version_column_is_read_as_version_1(table: pd.DataFrame, tmp_path: Path) -> None:
    """The format train.py wrote before the version column (the run folders under logs/ have it) still loads."""
    table["split"] = split_lesions(table, FRACTIONS, seed=5)
    run = tmp_path / "run"
    run.mkdir()
    table[["image_id", "lesion_id", "dx", "split"]].to_csv(run / "split.csv", index=False)
    assert load_split(table.drop(columns="split"), run / "split.csv").equals(table["split"])
    assert RunFolder(run).split_ids("val") == frozenset(table.loc[table["split"] == "val", "image_id"])


def test_a_split_csv_of_an_unknown_version_is_refused_naming_the_file(table: pd.DataFrame, tmp_path: Path) -> None:
    table["split"] = split_lesions(table, FRACTIONS, seed=5)
    path = save_split(table, tmp_path / "split.csv")
    saved = pd.read_csv(path)
    saved.assign(schema_version=SPLIT_FILE_VERSION + 1).to_csv(path, index=False)
    where = re.escape(str(path))
    with pytest.raises(ContractError, match=rf"{where} is a split file of schema version 2 .*drop data.split_file"):
        load_split(table.drop(columns="split"), path)
    with pytest.raises(ContractError, match=rf"{where} is a split file of schema version 2"):
        RunFolder(tmp_path).split_ids("val")  # every reader of split.csv goes through the one reader
    saved.assign(schema_version=[1, 2] * (len(saved) // 2) + [1] * (len(saved) % 2)).to_csv(path, index=False)
    with pytest.raises(ContractError, match=rf"{where} has the schema_version value\(s\) \['1', '2'\]"):
        load_split(table.drop(columns="split"), path)


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda d: d.drop(columns="split"), r"lacks column\(s\) \['split'\]"),
        (lambda d: d.assign(split=d["split"].replace("val", "valid")), r"unknown split name\(s\) \['valid'\]"),
        (lambda d: pd.concat([d, d.iloc[:1]]), r"lists image_id\(s\) ISIC_\d+ more than once"),
        (lambda d: d.assign(fold="x"), r"fold values that are not whole numbers"),
    ],
)
def test_a_malformed_split_file_is_refused_naming_the_file_and_the_fix(
    table: pd.DataFrame, tmp_path: Path, spoil, message: str
) -> None:
    table["split"] = split_lesions(table, FRACTIONS, seed=5)
    path = save_split(table, tmp_path / "split.csv")
    spoil(pd.read_csv(path, dtype=str)).to_csv(path, index=False)
    with pytest.raises(ContractError, match=rf"Split file {re.escape(str(path))} .*{message}"):
        load_split(table.drop(columns="split"), path)


def test_a_missing_split_file_names_the_path_and_the_fix(table: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(ContractError, match=r"Split file not found: .*nope.csv. Give the split.csv that train.py"):
        load_split(table, tmp_path / "nope.csv")
