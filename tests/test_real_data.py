"""The real HAM10000 copies in ../shared/data, when present: complete, valid and split without leaks."""

from __future__ import annotations

import pandas as pd
import pytest

from lesionnet.data.metadata import load_ham10000
from lesionnet.data.split import split_lesions
from tests.conftest import REAL_DATA

COPIES = [REAL_DATA / "ham10000", REAL_DATA / "ham10000_200x150"]
PUBLISHED_COUNTS = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}


@pytest.fixture(scope="module", params=COPIES, ids=lambda p: p.name)
def real_table(request: pytest.FixtureRequest) -> pd.DataFrame:
    if not (request.param / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real HAM10000 not present at {request.param}")
    return load_ham10000(request.param)


def test_real_copy_has_every_image_and_the_published_class_counts(real_table: pd.DataFrame) -> None:
    assert len(real_table) == 10015
    assert real_table["lesion_id"].nunique() == 7470
    assert real_table["dx"].value_counts().to_dict() == PUBLISHED_COUNTS


def test_real_split_is_leak_free_and_keeps_class_proportions(real_table: pd.DataFrame) -> None:
    split = split_lesions(real_table, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=42)
    df = real_table.assign(split=split)
    assert (df.groupby("lesion_id")["split"].nunique() == 1).all()
    lesions = df.drop_duplicates("lesion_id")
    share = pd.crosstab(lesions["dx"], lesions["split"], normalize="columns")
    overall = lesions["dx"].value_counts(normalize=True)
    for split_name in ("train", "val", "test"):
        assert (share[split_name] - overall).abs().max() < 0.01
