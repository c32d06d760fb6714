"""Which images made a checkpoint: stored inside it, so a copied ``.ckpt`` still knows what it must not be scored on.

Every image that trained or validated the model is recorded with its id, lesion id, split, content hash (sha256 of
the file: an identical copy under another name) and DCT hashes of its picture and of sub-windows of it
(``dct_windows``: a resized, re-encoded, flipped, rotated, cropped or colour-jittered copy). evaluate.py compares a
scored set against this record, whatever folder the checkpoint was copied to.

The hashes are computed in the data layer (:mod:`lesionnet.data.fingerprint`, which decodes images as the inference
core does); this module stores them and matches them. A scored image (its whole picture, in each orientation that may
be canonical) within ``PHASH_MATCH_BITS`` of 255 bits of any window of a recorded image is the same picture. The
threshold, the windows and the shares of copies caught per transform, with the false matches among test images of
other lesions, were measured on HAM10000 by bench/near_duplicates.py (docs/RESULTS.md, "leak guard: near-duplicates").

A record cannot be empty nor detached from its weights. It carries its images per split (``counts``) and the sha256
of its (image_id, lesion_id, split) rows (``table_sha256``), both checked against its own lists when read; the
checkpoint carries, beside it, a binding digest (``BINDING_KEY``: sha256 of the record's canonical JSON and the bytes
of every ``state_dict`` tensor) computed when the checkpoint is saved and checked when it is loaded, so a record
copied from another checkpoint, or weights changed after training, are refused. Like every digest of the contract,
the binding detects mistakes and edits; it is not a signature (whoever edits the file can recompute it). A distilled
student's record is the union of its own and its teachers' records (``with_teachers``): what it learnt from
includes what they learnt from.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lesionnet.contract.digest import canonical, sha256_of

# 2: counts per split, the table digest, the teachers of a distilled student, and the binding to the weights.
# 3: ``dct_windows`` (hashes of sub-windows, in a canonical D4 orientation, of the picture as the core decodes it)
#    instead of one hash of the picture without its EXIF orientation (``phash``).
log = logging.getLogger(__name__)
PROVENANCE_VERSION = 2  # 2: bound to the weights, complete (counts, table digest), D4/crop-window hashes
UNBOUND_VERSION = 1  # records before the binding to the weights: read as unknown provenance
CHECKPOINT_KEY = "lesionnet_provenance"
BINDING_KEY = "lesionnet_provenance_binding"  # sha256 of the record and the state_dict it was saved with
# Fields of the record as a whole; every other field of Provenance is a per-image column (one entry an image).
RECORD_FIELDS: tuple[str, ...] = ("version", "counts", "table_sha256", "teachers")
RETRAIN = "Use the checkpoint file train.py wrote (not a copy whose provenance was edited or replaced), or retrain."
PHASH_MATCH_BITS = 32  # of 255 bits: at most this far from a recorded window is the same picture (measured)
HASH_BYTES = 32  # one DCT hash: 255 bits and a zero bit
_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


class ProvenanceError(ValueError):
    """A checkpoint's provenance forbids (or cannot vouch for) scoring it on a set; the message says why and how."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes: the identity of a checkpoint and of an image."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def table_digest(image_id: Sequence[str], lesion_id: Sequence[str], split: Sequence[str]) -> str:
    """sha256 of a split table's (image_id, lesion_id, split) rows, whatever their order (canonical JSON, sorted)."""
    rows = sorted(zip(map(str, image_id), map(str, lesion_id), map(str, split), strict=True))
    return sha256_of(rows)


def binding_digest(record: Mapping[str, Any], state_dict: Mapping[str, Any]) -> str:
    """sha256 binding a stored provenance record to the weights saved with it: the record's canonical JSON, then each
    ``state_dict`` entry in name order (name, dtype, shape and the tensor's bytes)."""
    digest = hashlib.sha256(canonical(record).encode())
    for name in sorted(state_dict):
        value = state_dict[name]
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"\n{name}:{tensor.dtype}:{list(value.shape)}\n".encode())
            digest.update(tensor.view(torch.uint8).numpy().data)  # raw bytes of any dtype (bfloat16 included)
        else:
            digest.update(f"\n{name}:{value!r}\n".encode())
    return digest.hexdigest()


def _bits(hashes: Sequence[str]) -> np.ndarray:
    return np.array([np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in hashes], dtype=np.uint8).reshape(
        len(hashes), -1
    )


def encode_hashes(hashes: bytes) -> str:
    """Concatenated hashes as stored in a record (base64: JSON-safe, a third larger than the bytes)."""
    return base64.b64encode(hashes).decode("ascii")


def _words(hashes: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Items of one or more concatenated hashes -> every hash as a row of 64-bit words, and the item each row is of."""
    counts = [len(h) // HASH_BYTES for h in hashes]
    if any(len(h) % HASH_BYTES or not len(h) for h in hashes):
        raise ProvenanceError(f"A fingerprint is not a whole number of {HASH_BYTES}-byte hashes. {RETRAIN}")
    words = np.frombuffer(b"".join(hashes), dtype=np.uint64).reshape(-1, HASH_BYTES // 8)
    return words, np.repeat(np.arange(len(hashes)), counts)


def _bit_count(words: np.ndarray) -> np.ndarray:
    """Set bits of each 64-bit word, as uint8 (``np.bitwise_count`` where numpy has it: numpy >= 2)."""
    if hasattr(np, "bitwise_count"):
        counted: np.ndarray = np.bitwise_count(words)
        return counted
    return _POPCOUNT[words.view(np.uint8)].reshape(*words.shape, 8).sum(axis=-1, dtype=np.uint8)


def nearest_matches(
    queries: Sequence[bytes],
    references: Sequence[bytes],
    cap: int = PHASH_MATCH_BITS,
    exclude: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For each query (its hashes concatenated), the smallest Hamming distance from any of its hashes to any hash of
    a reference, and that reference's index. Exact up to ``cap``; above it, a lower bound (the first half's bits),
    with index -1. No reference: distance int32 max. ``exclude``: per query, a reference never matched (itself, when a
    set is matched against its own record; -1: none)."""
    if not 0 <= cap < 128:  # (sums of bit counts are kept in uint8)
        raise ValueError(f"cap must be in [0, 128) bits, got {cap}.")
    distances = np.full(len(queries), np.iinfo(np.int32).max, dtype=np.int32)
    nearest = np.full(len(queries), -1, dtype=np.int64)
    if not references or not queries:
        return distances, nearest
    ref, ref_owner = _words(references)
    ref_words = np.ascontiguousarray(ref.T)  # (4, hashes): one word of every reference hash per row
    query, query_owner = _words(queries)
    half = HASH_BYTES // 16  # words in the first half: a cheap lower bound that rules out most references
    for row, owner in zip(query, query_owner, strict=True):
        low = _bit_count(ref_words[0] ^ row[0])  # uint8: at most 255 differing bits in all
        for w in range(1, half):
            low += _bit_count(ref_words[w] ^ row[w])
        if exclude is not None and exclude[owner] >= 0:
            low[ref_owner == exclude[owner]] = np.iinfo(low.dtype).max
        close = np.flatnonzero(low <= cap)
        found, index = int(low.min()), -1
        if close.size:
            full = low[close]
            for w in range(half, ref_words.shape[0]):
                full += _bit_count(ref_words[w, close] ^ row[w])
            k = int(full.argmin())
            found, index = (int(full[k]), int(ref_owner[close[k]])) if full[k] <= cap else (cap + 1, -1)
        if found < distances[owner]:
            distances[owner], nearest[owner] = found, index
    return distances, nearest


def nearest_distances(queries: Sequence[str], references: Sequence[str], chunk: int = 256) -> np.ndarray:
    """Hamming distance from each query hash (hex, one hash each) to its nearest reference hash (bits)."""
    if not references:
        return np.full(len(queries), np.iinfo(np.int32).max)
    ref, query = _bits(references), _bits(queries)
    out = np.empty(len(query), dtype=np.int32)
    for start in range(0, len(query), chunk):
        xor = np.bitwise_xor(query[start : start + chunk, None, :], ref[None, :, :])
        out[start : start + chunk] = _POPCOUNT[xor].sum(axis=2, dtype=np.int32).min(axis=1)
    return out


@dataclass(frozen=True)
class Overlap:
    """What a scored set shares with a checkpoint's training and validation images (all must be empty)."""

    same_id: list[str]
    same_bytes: list[str]
    same_picture: list[str]
    same_lesion: list[str]
    # Each scored image of ``same_picture`` -> the recorded image it is a copy of (for messages).
    copies: dict[str, str] = field(default_factory=dict)

    @property
    def images(self) -> list[str]:
        """Scored images that are, by id, content or picture, an image the model learnt from or was chosen on."""
        return sorted(set(self.same_id) | set(self.same_bytes) | set(self.same_picture))

    def counts(self) -> dict[str, int]:
        found = {key: len(value) for key, value in asdict(self).items() if key != "copies"}
        return found | {"images": len(self.images)}


@dataclass(frozen=True)
class Provenance:
    """The training and validation images of one checkpoint (columns of equal length; plain data)."""

    image_id: list[str]
    lesion_id: list[str]
    split: list[str]
    sha256: list[str]
    # Base64 of the image's window hashes (lesionnet.data.fingerprint.WINDOWS order, HASH_BYTES each).
    dct_windows: list[str]
    version: int = PROVENANCE_VERSION
    # Images per split and the sha256 of the (image_id, lesion_id, split) rows: computed from the columns when not
    # given, checked against them when read from a checkpoint.
    counts: dict[str, int] = field(default_factory=dict)
    table_sha256: str = ""
    # A distilled student's teachers (checkpoint sha256, counts, table_sha256), their own teachers included.
    teachers: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.table_sha256:  # built here, not read: describe the columns as they are
            object.__setattr__(self, "counts", self.listed_counts())
            object.__setattr__(self, "table_sha256", table_digest(self.image_id, self.lesion_id, self.split))

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        """The per-image columns (every field but ``RECORD_FIELDS``), in field order."""
        return tuple(f.name for f in fields(cls) if f.name not in RECORD_FIELDS)

    def listed_counts(self) -> dict[str, int]:
        """Images per split as the columns list them."""
        return dict(sorted(Counter(map(str, self.split)).items()))

    def problems(self) -> list[str]:
        """What makes this record unfit to vouch for a model (empty when it is sound)."""
        lengths = {c: len(getattr(self, c)) for c in self.columns()}
        if len(set(lengths.values())) > 1:
            return [f"its per-image columns differ in length ({lengths})"]
        found = []
        if not self.listed_counts().get("train"):
            found.append(
                f"it lists no training image (an empty record vouches for nothing; {len(self.image_id)} image(s))"
            )
        if dict(self.counts) != self.listed_counts():
            found.append(f"its counts per split {dict(self.counts)} are not the images it lists {self.listed_counts()}")
        if self.table_sha256 != table_digest(self.image_id, self.lesion_id, self.split):
            found.append("its table_sha256 is not the digest of the (image_id, lesion_id, split) rows it lists")
        return found

    def check(self, source: str | Path) -> None:
        """Refuse a record that is empty or does not match its own counts and digest."""
        if found := self.problems():
            raise ProvenanceError(
                f"{source}: its provenance record cannot vouch for what the model trained on: {'; '.join(found)}. "
                f"{RETRAIN}"
            )

    def subset(self, splits: Iterable[str]) -> Provenance:
        """The rows of some splits (e.g. only the training images), with their own counts and digest."""
        wanted = set(splits)
        keep = [k for k, split in enumerate(self.split) if split in wanted]
        kept: dict[str, Any] = {c: [getattr(self, c)[k] for k in keep] for c in self.columns()}
        return Provenance(**kept, teachers=list(self.teachers))

    def with_teachers(self, teachers: Sequence[tuple[str, Provenance]]) -> Provenance:
        """This record united with its teachers' (each: the sha256 of the teacher's checkpoint, its record): a
        distilled student learnt from what they trained and were validated on. An image listed by several records
        keeps one row, a training row where any record trained on it."""
        rows: dict[str, dict[str, Any]] = {}
        for record in (self, *(record for _, record in teachers)):
            for k, image in enumerate(record.image_id):
                kept = rows.get(image)
                if kept is None or (record.split[k] == "train" and kept["split"] != "train"):
                    rows[image] = {c: getattr(record, c)[k] for c in self.columns()}
        summaries = list(self.teachers)
        for sha256, record in teachers:
            summaries.append({"sha256": sha256, "counts": dict(record.counts), "table_sha256": record.table_sha256})
            summaries += record.teachers
        united: dict[str, Any] = {c: [row[c] for row in rows.values()] for c in self.columns()}
        return Provenance(**united, teachers=summaries)

    def store(self, checkpoint: dict[str, Any]) -> None:
        """Write this record and its binding to the checkpoint's ``state_dict`` into a checkpoint being saved."""
        self.check("the provenance record being saved")
        record = self.to_checkpoint()
        checkpoint[CHECKPOINT_KEY] = record
        checkpoint[BINDING_KEY] = binding_digest(record, checkpoint.get("state_dict") or {})

    def to_checkpoint(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], source: str | Path) -> Provenance | None:
        """The provenance stored in a loaded checkpoint dict, checked to be complete and bound to the checkpoint's
        weights; None for checkpoints written before provenance existed or before records were bound (version 1):
        both count as unknown provenance."""
        stored = checkpoint.get(CHECKPOINT_KEY)
        if stored is None:
            return None
        version = stored.get("version") if isinstance(stored, dict) else None
        if version == UNBOUND_VERSION:  # trained before records were bound to weights: it cannot vouch, like none
            log.warning(
                "%s carries a provenance record of version %d, not bound to its weights: it cannot vouch for what "
                "the model trained on, so it counts as unknown (score it with allow_unknown_provenance=true, or "
                "retrain for a bound record).",
                source,
                version,
            )
            return None
        if version != PROVENANCE_VERSION:
            raise ProvenanceError(
                f"{source} carries provenance version {version}; this LesionNet reads version "
                f"{PROVENANCE_VERSION}. Evaluate it with the LesionNet version that wrote it, or retrain."
            )
        names = {f.name for f in fields(cls)}
        # (an empty table_sha256 would be recomputed from the columns: a record read must bring its own)
        missing = sorted(names - set(stored)) or (["table_sha256"] if not stored["table_sha256"] else [])
        unknown = sorted(set(stored) - names)
        if missing or unknown:
            raise ProvenanceError(
                f"{source}: its provenance record is malformed (missing fields {missing}, unknown fields {unknown}). "
                f"{RETRAIN}"
            )
        record = cls(**stored)
        record.check(source)
        binding = checkpoint.get(BINDING_KEY)
        if binding is None:
            raise ProvenanceError(
                f"{source}: its provenance record is not bound to its weights (no {BINDING_KEY}). {RETRAIN}"
            )
        if binding != binding_digest(stored, checkpoint.get("state_dict") or {}):
            raise ProvenanceError(
                f"{source}: its provenance record is not the one saved with these weights ({BINDING_KEY} does not "
                "match the record and the state_dict: a record copied from another checkpoint, or weights changed "
                f"after training), so it cannot vouch for what this model trained on. {RETRAIN}"
            )
        return record

    def windows(self) -> list[bytes]:
        """Each recorded image's window hashes, concatenated (decoded from ``dct_windows``)."""
        try:
            return [base64.b64decode(text, validate=True) for text in self.dct_windows]
        except (ValueError, TypeError) as err:
            raise ProvenanceError(f"A provenance record's dct_windows are not base64 ({err}). {RETRAIN}") from err

    def overlap(self, table: pd.DataFrame, sha256: Sequence[str], views: Sequence[bytes]) -> Overlap:
        """Scored images (``table`` with image_id and, when known, lesion_id; their sha256 and their pictures' view
        hashes, :func:`lesionnet.data.fingerprint.view_hashes`) shared with us."""
        ids = table["image_id"].astype(str).to_numpy()
        distances, nearest = nearest_matches(list(views), self.windows())
        lesions = table["lesion_id"].astype(str) if "lesion_id" in table.columns else pd.Series([], dtype=str)
        matched = distances <= PHASH_MATCH_BITS
        return Overlap(
            same_id=sorted(set(ids) & set(self.image_id)),
            same_bytes=sorted(ids[np.isin(np.asarray(sha256), np.asarray(self.sha256))].tolist()),
            same_picture=sorted(ids[matched].tolist()),
            same_lesion=sorted(set(lesions.dropna()) & set(self.lesion_id)),
            copies={str(i): self.image_id[k] for i, k in zip(ids[matched], nearest[matched], strict=True)},
        )
