"""Which images made a checkpoint: stored inside it, so a copied ``.ckpt`` still knows what it must not be scored on.

Every image that trained or validated the model is recorded with its id, lesion id, split, content hash (sha256 of
the file: an identical copy under another name) and a perceptual hash (a resized or re-encoded copy). evaluate.py
compares a scored set against this record, whatever folder the checkpoint was copied to.

The perceptual hash is a DCT hash (pHash): 32x32 greyscale, the 16x16 lowest frequencies without DC, each bit
"above the median". Measured on the 10,015 HAM10000 images (200x150 copy): copies resized to 100x75 .. 600x450 and
re-encoded as JPEG (quality 60-85) lie within 24 of 255 bits of the original; the nearest image of ANOTHER lesion
lies 34 bits or more away for all but one pair of images (a duplicate in HAM10000 itself). Images within
``PHASH_MATCH_BITS`` count as the same picture.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from scipy.fft import dctn

PROVENANCE_VERSION = 1
CHECKPOINT_KEY = "lesionnet_provenance"
PHASH_MATCH_BITS = 32
_PHASH_GRID = 32
_PHASH_FREQUENCIES = 16
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


def perceptual_hash(image: Image.Image) -> str:
    """255-bit DCT hash of a picture as hex; near-identical for resized or re-encoded copies (see the module doc)."""
    grey = np.asarray(image.convert("L").resize((_PHASH_GRID, _PHASH_GRID), Image.Resampling.BOX), dtype=np.float64)
    low = dctn(grey, norm="ortho")[:_PHASH_FREQUENCIES, :_PHASH_FREQUENCIES].ravel()[1:]
    return np.packbits(low > np.median(low)).tobytes().hex()


def fingerprint(path: str | Path) -> tuple[str, str]:
    """(sha256, perceptual hash) of an image file."""
    with Image.open(path) as image:
        return file_sha256(path), perceptual_hash(image)


def _bits(hashes: Sequence[str]) -> np.ndarray:
    return np.array([np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in hashes], dtype=np.uint8).reshape(
        len(hashes), -1
    )


def nearest_distances(queries: Sequence[str], references: Sequence[str], chunk: int = 256) -> np.ndarray:
    """Hamming distance from each query hash to its nearest reference hash (bits)."""
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

    @property
    def images(self) -> list[str]:
        """Scored images that are, by id, content or picture, an image the model learnt from or was chosen on."""
        return sorted(set(self.same_id) | set(self.same_bytes) | set(self.same_picture))

    def counts(self) -> dict[str, int]:
        return {key: len(value) for key, value in asdict(self).items()} | {"images": len(self.images)}


@dataclass(frozen=True)
class Provenance:
    """The training and validation images of one checkpoint (columns of equal length; plain data)."""

    image_id: list[str]
    lesion_id: list[str]
    split: list[str]
    sha256: list[str]
    phash: list[str]
    version: int = PROVENANCE_VERSION

    @classmethod
    def from_table(cls, table: pd.DataFrame, splits: Iterable[str] = ("train", "val")) -> Provenance:
        """Fingerprint the images of ``splits`` in a split table (image_id, lesion_id, split, path)."""
        part = table[table["split"].isin(list(splits))]
        prints = [fingerprint(path) for path in part["path"]]
        return cls(
            image_id=part["image_id"].astype(str).tolist(),
            lesion_id=part["lesion_id"].astype(str).tolist(),
            split=part["split"].astype(str).tolist(),
            sha256=[sha for sha, _ in prints],
            phash=[phash for _, phash in prints],
        )

    def to_checkpoint(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], source: str | Path) -> Provenance | None:
        """The provenance stored in a loaded checkpoint dict; None for checkpoints written before it existed."""
        stored = checkpoint.get(CHECKPOINT_KEY)
        if stored is None:
            return None
        version = stored.get("version") if isinstance(stored, dict) else None
        if version != PROVENANCE_VERSION:
            raise ProvenanceError(
                f"{source} carries provenance version {version}; this LesionNet reads version {PROVENANCE_VERSION}. "
                "Evaluate it with the LesionNet version that wrote it, or retrain."
            )
        return cls(**stored)

    def overlap(self, table: pd.DataFrame, sha256: Sequence[str], phash: Sequence[str]) -> Overlap:
        """Scored images (``table`` with image_id and, when known, lesion_id; their fingerprints) shared with us."""
        ids = table["image_id"].astype(str).to_numpy()
        distances = nearest_distances(list(phash), self.phash)
        lesions = table["lesion_id"].astype(str) if "lesion_id" in table.columns else pd.Series([], dtype=str)
        return Overlap(
            same_id=sorted(set(ids) & set(self.image_id)),
            same_bytes=sorted(ids[np.isin(np.asarray(sha256), np.asarray(self.sha256))].tolist()),
            same_picture=sorted(ids[distances <= PHASH_MATCH_BITS].tolist()),
            same_lesion=sorted(set(lesions.dropna()) & set(self.lesion_id)),
        )
