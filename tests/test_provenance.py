"""Provenance fingerprints: copies of real HAM10000 images resized, re-encoded, flipped, rotated (pixels or EXIF tag),
cropped or colour-jittered as training does are recognised, other lesions not; a record that is empty, does not
match its own lists or is not the one saved with the weights is refused."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageEnhance

from lesionnet.contract.provenance import (
    BINDING_KEY,
    CHECKPOINT_KEY,
    PHASH_MATCH_BITS,
    Provenance,
    ProvenanceError,
    binding_digest,
    nearest_distances,
    nearest_matches,
)
from lesionnet.data.fingerprint import fingerprints, perceptual_hash, provenance_of
from lesionnet.data.metadata import embedded_sample_root, load_ham10000
from lesionnet.data.run_folder import RunFolder
from lesionnet.evaluation.guard import check_provenance
from lesionnet.inference import Member, load_member


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
    provenance = provenance_of(sample.head(10))
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
    prints = fingerprints(scored["path"])
    overlap = provenance.overlap(scored, [p.sha256 for p in prints], [p.views for p in prints])
    assert overlap.same_bytes == sorted(["renamed", sample["image_id"].iloc[2]])
    assert overlap.same_id == [sample["image_id"].iloc[2]]
    assert "resized" in overlap.same_picture and "fresh" not in overlap.images
    assert overlap.counts()["images"] == 3


# What the training augmentation does to an image (lesionnet/conf/data/ham10000.yaml, data.augment): each a copy and
# the EXIF orientation it is saved with (6: the pixels are stored turned back, the tag turns them upright again).
TRAINING_COPIES: dict[str, Callable[[Image.Image], tuple[Image.Image, int | None]]] = {
    "horizontal flip": lambda im: (im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), None),
    "vertical flip": lambda im: (im.transpose(Image.Transpose.FLIP_TOP_BOTTOM), None),
    "rotated 90": lambda im: (im.transpose(Image.Transpose.ROTATE_90), None),
    "transposed": lambda im: (im.transpose(Image.Transpose.TRANSPOSE), None),
    "pixels rotated + EXIF orientation 6": lambda im: (im.transpose(Image.Transpose.ROTATE_90), 6),
    "crop 10% off one side": lambda im: (im.crop((0, 0, round(im.width * 0.9), im.height)), None),
    "crop 5% each side": lambda im: (
        im.crop((round(im.width * 0.05), round(im.height * 0.05), round(im.width * 0.95), round(im.height * 0.95))),
        None,
    ),
    "crop to 60% of the area, flipped": lambda im: (
        im.crop(
            (round(im.width * 0.113), round(im.height * 0.113), round(im.width * 0.887), round(im.height * 0.887))
        ).transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        None,
    ),
    "brightness x1.2, contrast x0.8, resized": lambda im: (
        ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(1.2)).enhance(0.8).resize((300, 225)),
        None,
    ),
}


def saved_copy(path: str, name: str, out: Path) -> Path:
    with Image.open(path) as original:
        copy, orientation = TRAINING_COPIES[name](original.convert("RGB"))
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    copy.save(out, quality=90, exif=exif)
    return out


@pytest.mark.parametrize("name", list(TRAINING_COPIES))
def test_real_images_flipped_rotated_cropped_or_jittered_as_training_does_match_their_source(
    sample: pd.DataFrame, tmp_path: Path, name: str
) -> None:
    originals = sample.head(40)
    record = provenance_of(originals)
    copies = fingerprints(
        saved_copy(path, name, tmp_path / f"copy_{k}.jpg") for k, path in enumerate(originals["path"])
    )
    distances, nearest = nearest_matches([p.views for p in copies], record.windows())
    assert (distances <= PHASH_MATCH_BITS).all(), (name, distances.max())
    matched_lesions = [record.lesion_id[k] for k in nearest]  # (or another photo of the same lesion)
    assert matched_lesions == originals["lesion_id"].tolist()


def test_the_fingerprint_decodes_as_the_inference_core_does_with_the_exif_orientation(
    sample: pd.DataFrame, tmp_path: Path
) -> None:
    path = sample["path"].iloc[0]
    tagged = saved_copy(path, "pixels rotated + EXIF orientation 6", tmp_path / "tagged.jpg")
    with Image.open(tagged) as stored, Image.open(path) as original:
        assert stored.size == (original.height, original.width)  # the pixels are stored on their side
        upright, on_its_side = perceptual_hash(stored), perceptual_hash(np.asarray(stored.convert("RGB")))
        assert nearest_distances([upright], [perceptual_hash(original)])[0] <= PHASH_MATCH_BITS  # decoded upright
        assert nearest_distances([on_its_side], [perceptual_hash(original)])[0] > 2 * PHASH_MATCH_BITS


def test_no_real_image_matches_a_window_of_another_lesions_image(sample: pd.DataFrame) -> None:
    prints = fingerprints(sample["path"])
    distances, nearest = nearest_matches(
        [p.views for p in prints], [p.windows for p in prints], exclude=list(range(len(prints)))
    )
    lesions = sample["lesion_id"].to_numpy()
    matched = np.flatnonzero(distances <= PHASH_MATCH_BITS)
    assert [(lesions[k], lesions[nearest[k]]) for k in matched if lesions[k] != lesions[nearest[k]]] == []


def test_provenance_of_another_version_is_refused() -> None:
    stored = {"lesionnet_provenance": {"version": 99, "image_id": []}}
    with pytest.raises(ProvenanceError, match="provenance version 99"):
        Provenance.from_checkpoint(stored, "model.ckpt")
    assert Provenance.from_checkpoint({}, "old.ckpt") is None


def test_a_record_from_before_binding_counts_as_unknown_provenance(caplog: pytest.LogCaptureFixture) -> None:
    """A version-1 record is not bound to its weights, so it cannot vouch: like no record, it needs
    allow_unknown_provenance=true (evaluate.py's guard then reports the provenance as unknown)."""
    previous = {"lesionnet_provenance": {"version": 1, "image_id": ["a"], "lesion_id": ["l"], "split": ["train"]}}
    with caplog.at_level("WARNING"):
        assert Provenance.from_checkpoint(previous, "model.ckpt") is None
    assert "not bound to its weights" in caplog.text and "allow_unknown_provenance=true" in caplog.text
    np.testing.assert_array_equal(nearest_distances(["00" * 32], []), [np.iinfo(np.int32).max])


def test_a_byte_identical_copy_under_another_id_is_a_dataset_duplicate_only_on_the_runs_own_split(
    sample: pd.DataFrame, tmp_path: Path
) -> None:
    member = Member("m", tmp_path / "m.ckpt", None, "0" * 64, provenance_of(sample.head(10)), None)
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


# ------------------------------------------------------------------ the record in a checkpoint: complete and bound


def saved_checkpoint(trained_run: Path) -> dict[str, Any]:
    checkpoint: dict[str, Any] = torch.load(RunFolder(trained_run).best_checkpoint(), weights_only=True)
    return checkpoint


def rewritten(checkpoint: dict[str, Any], path: Path, record: Provenance | dict[str, Any], bind: bool) -> Path:
    """``checkpoint`` with another provenance record (``bind``: re-bound to its weights, as train.py would) at path."""
    stored = record.to_checkpoint() if isinstance(record, Provenance) else record
    checkpoint = {**checkpoint, CHECKPOINT_KEY: stored}
    if bind:
        checkpoint[BINDING_KEY] = binding_digest(stored, checkpoint["state_dict"])
    torch.save(checkpoint, path)
    return path


def test_a_checkpoint_carries_its_split_table_bound_to_its_weights(trained_run: Path, tmp_path: Path) -> None:
    member = load_member(RunFolder(trained_run).best_checkpoint())
    split = pd.read_csv(trained_run / "split.csv")
    assert member.provenance is not None
    assert member.provenance.counts == split["split"].value_counts()[["train", "val"]].sort_index().to_dict()
    checkpoint = saved_checkpoint(trained_run)
    name = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"][name] = checkpoint["state_dict"][name] + 1e-3  # weights changed after training
    torch.save(checkpoint, tmp_path / "tuned.ckpt")
    with pytest.raises(ProvenanceError, match="not the one saved with these weights"):
        load_member(tmp_path / "tuned.ckpt")


def test_an_empty_provenance_record_is_refused(trained_run: Path, tmp_path: Path) -> None:
    checkpoint = saved_checkpoint(trained_run)
    record = Provenance.from_checkpoint(checkpoint, "run")
    assert record is not None
    empty = record.subset([])  # consistent counts and digest of no image, bound to the weights: still refused
    assert empty.counts == {} and not empty.image_id
    with pytest.raises(ProvenanceError, match=r"lists no training image.*Use the checkpoint file train.py wrote"):
        load_member(rewritten(checkpoint, tmp_path / "empty.ckpt", empty, bind=True))
    with pytest.raises(ProvenanceError, match="lists no training image"):  # only validation images
        load_member(rewritten(checkpoint, tmp_path / "val.ckpt", record.subset(["val"]), bind=True))
    truncated = {**record.to_checkpoint(), **{c: getattr(record, c)[1:] for c in Provenance.columns()}}
    with pytest.raises(ProvenanceError, match="its counts per split .* are not the images it lists"):
        load_member(rewritten(checkpoint, tmp_path / "truncated.ckpt", truncated, bind=True))
    renamed = {**record.to_checkpoint(), "image_id": ["ISIC_other", *record.image_id[1:]]}  # counts still match
    with pytest.raises(ProvenanceError, match="table_sha256 is not the digest"):
        load_member(rewritten(checkpoint, tmp_path / "renamed.ckpt", renamed, bind=True))


def test_a_provenance_record_copied_from_another_checkpoint_is_refused(trained_run: Path, tmp_path: Path) -> None:
    original = saved_checkpoint(trained_run)
    record = Provenance.from_checkpoint(original, "run")
    assert record is not None
    other = {
        **original,
        "state_dict": {k: v + 1 if v.is_floating_point() else v for k, v in original["state_dict"].items()},
    }
    own = rewritten(other, tmp_path / "other.ckpt", record.subset(["train"]), bind=True)  # another model, its record
    assert load_member(own).provenance == record.subset(["train"])
    copied = {**other, CHECKPOINT_KEY: original[CHECKPOINT_KEY]}  # the record of the original, the other's binding
    torch.save(copied, tmp_path / "copied.ckpt")
    with pytest.raises(ProvenanceError, match=r"not the one saved with these weights.*a record copied from another"):
        load_member(tmp_path / "copied.ckpt")
    torch.save({**copied, BINDING_KEY: original[BINDING_KEY]}, tmp_path / "both.ckpt")  # and its binding too
    with pytest.raises(ProvenanceError, match="not the one saved with these weights"):
        load_member(tmp_path / "both.ckpt")
    torch.save({k: v for k, v in copied.items() if k != BINDING_KEY}, tmp_path / "unbound.ckpt")
    with pytest.raises(ProvenanceError, match="not bound to its weights"):
        load_member(tmp_path / "unbound.ckpt")
