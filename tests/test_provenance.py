"""Provenance fingerprints: resized or re-encoded copies of real HAM10000 images are recognised, other lesions not."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesionnet.contract.provenance import (
    PHASH_MATCH_BITS,
    Provenance,
    ProvenanceError,
    nearest_distances,
    perceptual_hash,
)
from lesionnet.data.metadata import embedded_sample_root, load_ham10000
from lesionnet.evaluation.guard import check_provenance
from lesionnet.inference import Member


@pytest.fixture(scope="module")
def sample() -> pd.DataFrame:
    table = load_ham10000(embedded_sample_root())
    return table.assign(split="train")


def reencoded(path: str, size: tuple[int, int], quality: int) -> Image.Image:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer)


def test_resized_and_reencoded_copies_of_real_images_match(sample: pd.DataFrame) -> None:
    originals = [perceptual_hash(Image.open(p)) for p in sample["path"]]
    for size, quality in (((100, 75), 70), ((600, 450), 60), ((300, 225), 85)):
        copies = [perceptual_hash(reencoded(p, size, quality)) for p in sample["path"]]
        assert (nearest_distances(copies, originals) <= PHASH_MATCH_BITS).all(), (size, quality)


def test_images_of_other_lesions_do_not_match(sample: pd.DataFrame) -> None:
    hashes = [perceptual_hash(Image.open(p)) for p in sample["path"]]
    lesions = sample["lesion_id"].to_numpy()
    for k in range(len(hashes)):
        others = [h for h, lesion in zip(hashes, lesions, strict=True) if lesion != lesions[k]]
        assert nearest_distances([hashes[k]], others)[0] > PHASH_MATCH_BITS


def test_overlap_finds_ids_bytes_pictures_and_lesions(sample: pd.DataFrame, tmp_path: Path) -> None:
    provenance = Provenance.from_table(sample.head(10))
    renamed = tmp_path / "renamed.jpg"
    renamed.write_bytes(Path(sample["path"].iloc[0]).read_bytes())
    resized = tmp_path / "resized.png"
    reencoded(sample["path"].iloc[1], (400, 300), 75).save(resized)
    fresh = sample.iloc[[20]]
    scored = pd.DataFrame(
        {
            "image_id": ["renamed", "resized", sample["image_id"].iloc[2], "fresh"],
            "lesion_id": ["L1", "L2", "L3", fresh["lesion_id"].iloc[0]],
            "path": [str(renamed), str(resized), sample["path"].iloc[2], fresh["path"].iloc[0]],
        }
    )
    prints = Provenance.from_table(scored.assign(split="train"))
    overlap = provenance.overlap(scored, prints.sha256, prints.phash)
    assert overlap.same_bytes == sorted(["renamed", sample["image_id"].iloc[2]])
    assert overlap.same_id == [sample["image_id"].iloc[2]]
    assert "resized" in overlap.same_picture and "fresh" not in overlap.images
    assert overlap.counts()["images"] == 3


def test_provenance_of_another_version_is_refused() -> None:
    stored = {"lesionnet_provenance": {"version": 99, "image_id": []}}
    with pytest.raises(ProvenanceError, match="provenance version 99"):
        Provenance.from_checkpoint(stored, "model.ckpt")
    assert Provenance.from_checkpoint({}, "old.ckpt") is None
    np.testing.assert_array_equal(nearest_distances(["00" * 32], []), [np.iinfo(np.int32).max])


def test_a_byte_identical_copy_under_another_id_is_a_dataset_duplicate_only_on_the_runs_own_split(
    sample: pd.DataFrame, tmp_path: Path
) -> None:
    member = Member("m", tmp_path / "m.ckpt", None, "0" * 64, Provenance.from_table(sample.head(10)), None)
    copy = tmp_path / "ISIC_copy.jpg"  # HAM10000 files some photos twice under two ids, byte for byte
    copy.write_bytes(Path(sample["path"].iloc[0]).read_bytes())
    fresh = sample.iloc[20]
    target = pd.DataFrame(
        {
            "image_id": ["ISIC_copy", fresh["image_id"]],
            "lesion_id": ["HAM_other", fresh["lesion_id"]],
            "path": [str(copy), fresh["path"]],
        }
    )
    _, counts, duplicates = check_provenance([member], target, "test split", None, None, run_split=True)
    assert duplicates["target"] == ["ISIC_copy"] and counts["m"]["target_images"] == 0
    with pytest.raises(ProvenanceError, match="same file content: 1"):  # an external set: a renamed copy is refused
        check_provenance([member], target, "external set", None, None, run_split=False)
    same_id = target.assign(image_id=[sample["image_id"].iloc[0], fresh["image_id"]])
    with pytest.raises(ProvenanceError, match="same id: 1"):  # an id match is never excused
        check_provenance([member], same_id, "test split", None, None, run_split=True)
