"""Never score a model on images it learnt from or was chosen on, wherever its checkpoint file was copied.

Each checkpoint carries the ids, lesion ids, content hashes and DCT hashes of its training and validation images
(``lesionnet.contract.provenance``). The scored set is fingerprinted by the same code (``lesionnet.data.fingerprint``,
decoding as the inference core does) and compared: the same id, the same bytes under another name, or the same
picture resized, re-encoded, flipped, rotated, cropped or colour-shifted as the training augmentation does are all
refused; so is, in an external set whose labels carry ``lesion_id``, any lesion the model trained or was validated on
(another image of it is a near-duplicate). The set that chooses thresholds and ensemble weights (the run's validation
split) may share images with the model's validation record (that is its purpose) but never with its training record.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import pandas as pd

from lesionnet.contract.provenance import Overlap, Provenance, ProvenanceError
from lesionnet.data.fingerprint import fingerprints as fingerprint_files
from lesionnet.data.metadata import preview_items
from lesionnet.inference import Member

log = logging.getLogger(__name__)
CHECKED = "checked"
UNKNOWN = "unknown (the checkpoint predates bound provenance records; scored with allow_unknown_provenance=true)"


def fingerprints(table: pd.DataFrame) -> tuple[list[str], list[bytes]]:
    """(sha256, the picture's view hashes) of every image of a set, in table order."""
    prints = fingerprint_files(table["path"])
    return [p.sha256 for p in prints], [p.views for p in prints]


def record_key(record: Provenance) -> str:
    """What a record's overlap with a set depends on: members of one run (or one split) share it, computed once."""
    digest = hashlib.sha256(record.table_sha256.encode())
    for column in (record.sha256, record.dct_windows):
        digest.update("\n".join(column).encode())
    return digest.hexdigest()


def only(provenance: Provenance, splits: Sequence[str]) -> Provenance:
    """The part of a provenance record from some splits (e.g. only the training images)."""
    return provenance.subset(splits)


def refuse(member: Member, overlap: Overlap, description: str, learnt_from: str) -> None:
    if overlap.images:  # (callers drop dataset duplicates first, where that is allowed)
        raise ProvenanceError(
            f"{member.name} ({member.path}) {learnt_from} {len(overlap.images)} image(s) of the {description}: "
            f"{preview_items(overlap.images)} (same id: {len(overlap.same_id)}, same file content: "
            f"{len(overlap.same_bytes)}, same picture resized, re-encoded, flipped, rotated, cropped or colour-"
            f"shifted: {len(overlap.same_picture)}{copies_of(overlap)}). Scores on those images would be optimistic. "
            "Score it on images it never saw: the run's own test split (data.split=test with the run folder), or an "
            "external set without its training or validation images."
        )


def copies_of(overlap: Overlap) -> str:
    pairs = [f"{scored} ~ {recorded}" for scored, recorded in sorted(overlap.copies.items())]
    return f", e.g. {preview_items(pairs, limit=3)}" if pairs else ""


def refuse_lesions(member: Member, overlap: Overlap, description: str, learnt_from: str) -> None:
    """An external set's lesion ids (labels.csv ``lesion_id``) must be none the model learnt from."""
    if overlap.same_lesion:
        raise ProvenanceError(
            f"{member.name} ({member.path}) {learnt_from} {len(overlap.same_lesion)} lesion(s) of the {description}: "
            f"{preview_items(overlap.same_lesion)} (by the lesion_id of its labels). Another image of a lesion the "
            "model learnt from is a near-duplicate of it, so scores on those images would be optimistic. Remove "
            "those lesions' images (and their rows of the labels file) from the set, or score a checkpoint that "
            "never saw them."
        )


def check_provenance(
    members: Sequence[Member],
    target: pd.DataFrame,
    target_description: str,
    selection: pd.DataFrame | None,
    selection_description: str | None,
    allow_unknown: bool = False,
    in_sample: bool = False,
    run_split: bool = True,
) -> tuple[dict[str, str], dict[str, dict[str, int]], dict[str, list[str]]]:
    """Refuse any overlap; returns each member's provenance status, the overlap counts (lesions may be shared
    only on the seed's image-level legacy split, and are reported) and the dataset duplicates to leave out: on
    a run's own split (``run_split``; the selection set always is one) ids are disjoint by construction, so an
    image that matches a training image by content or picture under another id is the same photo filed twice in
    the dataset (HAM10000 has such pairs, some byte-identical); it is excluded from scoring and listed, where an
    external set with such an image is refused. ``in_sample``
    (scoring the validation split on purpose, titled optimistic) checks the scored set against the training
    images only."""
    status: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {}
    duplicates: dict[str, list[str]] = {"target": [], "selection": []}
    target_prints = fingerprints(target)
    selection_prints = fingerprints(selection) if selection is not None else None
    found: dict[tuple[str, str], Overlap] = {}  # (set, record_key): members with one record are matched once

    def overlap_of(
        record: Provenance, which: str, table: pd.DataFrame, prints: tuple[list[str], list[bytes]]
    ) -> Overlap:
        key = (which, record_key(record))
        if key not in found:
            found[key] = record.overlap(table, *prints)
        return found[key]

    for member in members:
        if member.provenance is None:
            if not allow_unknown:
                raise ProvenanceError(
                    f"{member.path} was written before checkpoints recorded the images that trained and validated "
                    "them, so evaluate.py cannot check it was not trained on the scored images. Retrain it, or pass "
                    "allow_unknown_provenance=true to score it anyway (scores.json and the report then say "
                    "'provenance unknown')."
                )
            log.warning("%s: provenance unknown; scored because allow_unknown_provenance=true.", member.name)
            status[member.name] = UNKNOWN
            continue
        record = only(member.provenance, ("train",)) if in_sample else member.provenance
        overlap = overlap_of(record, "target", target, target_prints)
        learnt_from = "was trained on" if in_sample else "was trained or validated on"
        if run_split:  # the run's own split: ids are disjoint by construction, a content match is a dataset duplicate
            duplicates["target"] += dataset_duplicates(overlap)
            overlap = without(overlap, duplicates["target"])
        refuse(member, overlap, target_description, learnt_from)
        if not run_split:  # (a run's own split shares lesions only on the legacy image-level split, reported)
            refuse_lesions(member, overlap, target_description, learnt_from)
        counts[member.name] = {"target_images": len(overlap.images), "target_lesions": len(overlap.same_lesion)}
        if selection is not None and selection_prints is not None:
            trained = overlap_of(only(member.provenance, ("train",)), "selection", selection, selection_prints)
            duplicates["selection"] += dataset_duplicates(trained)
            trained = without(trained, duplicates["selection"])
            refuse(
                member, trained, f"{selection_description} (used to choose thresholds and weights)", "was trained on"
            )
            counts[member.name]["selection_images_trained_on"] = len(trained.images)
        status[member.name] = CHECKED
    return status, counts, {key: sorted(set(ids)) for key, ids in duplicates.items()}


def dataset_duplicates(overlap: Overlap) -> list[str]:
    """Images that match by bytes or picture under another id: one photo filed twice in the dataset."""
    return sorted((set(overlap.same_bytes) | set(overlap.same_picture)) - set(overlap.same_id))


def without(overlap: Overlap, excluded: Sequence[str]) -> Overlap:
    """The overlap less the excluded images' content matches (an id match is never excused)."""
    drop = set(excluded)
    return Overlap(
        overlap.same_id,
        [i for i in overlap.same_bytes if i not in drop],
        [i for i in overlap.same_picture if i not in drop],
        overlap.same_lesion,
        {i: recorded for i, recorded in overlap.copies.items() if i not in drop},
    )
