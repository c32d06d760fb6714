"""Never score a model on images it learnt from or was chosen on, wherever its checkpoint file was copied.

Each checkpoint carries the ids, lesion ids, content hashes and perceptual hashes of its training and validation
images (``lesionnet.contract.provenance``). The scored set is fingerprinted the same way and compared: the same id,
the same bytes under another name, or the same picture resized or re-encoded are all refused. The set that chooses
thresholds and ensemble weights (the run's validation split) may share images with the model's validation record
(that is its purpose) but never with its training record.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pandas as pd

from lesionnet.contract.provenance import Overlap, Provenance, ProvenanceError, fingerprint
from lesionnet.data.metadata import preview_items
from lesionnet.inference import Member

log = logging.getLogger(__name__)
CHECKED = "checked"
UNKNOWN = "unknown (the checkpoint predates provenance records; scored with allow_unknown_provenance=true)"


def fingerprints(table: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(sha256, perceptual hash) of every image of a set, in table order."""
    prints = [fingerprint(path) for path in table["path"]]
    return [sha for sha, _ in prints], [phash for _, phash in prints]


def only(provenance: Provenance, splits: Sequence[str]) -> Provenance:
    """The part of a provenance record from some splits (e.g. only the training images)."""
    keep = [k for k, split in enumerate(provenance.split) if split in splits]
    columns = ("image_id", "lesion_id", "split", "sha256", "phash")
    kept: dict[str, Any] = {c: [getattr(provenance, c)[k] for k in keep] for c in columns}
    return Provenance(**kept)


def refuse(member: Member, overlap: Overlap, description: str, learnt_from: str) -> None:
    if overlap.images:  # (callers drop dataset duplicates first, where that is allowed)
        raise ProvenanceError(
            f"{member.name} ({member.path}) {learnt_from} {len(overlap.images)} image(s) of the {description}: "
            f"{preview_items(overlap.images)} (same id: {len(overlap.same_id)}, same file content: "
            f"{len(overlap.same_bytes)}, same picture resized or re-encoded: {len(overlap.same_picture)}). Scores on "
            "those images would be optimistic. Score it on images it never saw: the run's own test split "
            "(data.split=test with the run folder), or an external set without its training or validation images."
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
        overlap = record.overlap(target, *target_prints)
        if run_split:  # the run's own split: ids are disjoint by construction, a content match is a dataset duplicate
            duplicates["target"] += dataset_duplicates(overlap)
            overlap = without(overlap, duplicates["target"])
        refuse(member, overlap, target_description, "was trained on" if in_sample else "was trained or validated on")
        counts[member.name] = {"target_images": len(overlap.images), "target_lesions": len(overlap.same_lesion)}
        if selection is not None and selection_prints is not None:
            trained = only(member.provenance, ("train",)).overlap(selection, *selection_prints)
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
    )
