"""Fingerprints of image files for the provenance record and the leak guard, decoded by the one decoder.

Images are decoded by :func:`lesionnet.data.decode.read_rgb`, as the inference core decodes them (EXIF orientation
applied), so pixels stored rotated with an orientation tag are the picture the model would see. A fingerprint is the
sha256 of the file (the same bytes under another name) and DCT hashes (pHash) of the picture's luma: a window of it
box-resampled to 32x32, the 16x16 lowest frequencies without DC, each of the 255 bits "above the median" (32 bytes).
Such a hash does not change when the picture is resized, re-encoded or made brighter or more contrasted (a gain and an
offset move no coefficient across the median), and little under the colour jitter of the training augmentation.

Flips, 90-degree rotations and transposes (the D4 group, which the training augmentation applies) only flip the
signs of odd frequencies and transpose the block, so every hash is taken in a canonical orientation: transposed so
that the lowest horizontal frequency is the larger in magnitude, then flipped so that the two lowest frequencies are
positive. A scored image is hashed in every orientation that is canonical within ``VIEW_MARGIN`` of the block's AC
norm (usually one or two), so noise near a tie costs a second hash, never a miss.

Crops move every coefficient; a DCT hash tolerates about 2% of its window's width. A training or validation image is
therefore recorded with the hashes of ``WINDOWS``: the whole picture and the sub-windows a copy is commonly cut to
(5% off each side, the centre 60% of the area, 10% and 20% off one side); a copy cut like one of them, flipped or
rotated or not, matches that window. A crop of arbitrary place and size (what the training augmentation's random
resized crop makes) matches only when it lies near one of them, about 6% of them on HAM10000: covering every crop
down to 60% of the area at 2% would take thousands of windows per image. The measured shares per transform and the
false matches are in docs/RESULTS.md ("leak guard: near-duplicates", made by bench/near_duplicates.py). Matching
(distances, threshold) is the contract's: :mod:`lesionnet.contract.provenance`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.fft import dct

from lesionnet.contract.provenance import Provenance, encode_hashes, file_sha256
from lesionnet.data.decode import pil_to_rgb, read_rgb

GRID = 32  # the window is box-resampled to GRID x GRID luma
FREQUENCIES = 16  # the FREQUENCIES x FREQUENCIES lowest DCT frequencies, less DC: 255 bits
VIEW_MARGIN = 0.05  # a scored image's orientation is ambiguous where a deciding coefficient is within this share
MAX_SIDE = 512  # larger pictures are box-resampled to this first (a 32x32 grid needs no more; a phone photo is fast)
# Windows a training or validation image is hashed over, as fractions (left, top, right, bottom) of its width and
# height; chosen by measurement (bench/near_duplicates.py): the whole picture, 5% off each side, the centre 60% of
# the area, 10% and 20% off each side in turn.
WINDOWS: tuple[tuple[float, float, float, float], ...] = (
    (0.0, 0.0, 1.0, 1.0),
    (0.05, 0.05, 0.95, 0.95),
    (0.1127, 0.1127, 0.8873, 0.8873),
    (0.1, 0.0, 1.0, 1.0),
    (0.0, 0.0, 0.9, 1.0),
    (0.0, 0.1, 1.0, 1.0),
    (0.0, 0.0, 1.0, 0.9),
    (0.2, 0.0, 1.0, 1.0),
    (0.0, 0.0, 0.8, 1.0),
    (0.0, 0.2, 1.0, 1.0),
    (0.0, 0.0, 1.0, 0.8),
)
_WHOLE = ((0.0, 0.0, 1.0, 1.0),)
_ODD = (-1.0) ** np.arange(FREQUENCIES)  # a flip multiplies frequency k by (-1)**k


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an (H, W, 3) RGB array, as float32 (what Pillow's ``convert("L")`` rounds)."""
    pixels = np.asarray(rgb, dtype=np.float32)
    return pixels[..., 0] * 0.299 + pixels[..., 1] * 0.587 + pixels[..., 2] * 0.114


@lru_cache(maxsize=64)
def _projection(size: int, spans: tuple[tuple[float, float], ...]) -> np.ndarray:
    """(len(spans), FREQUENCIES, size): box-resample each span [start, end) (fractions) of ``size`` pixels to GRID
    cells (each the mean of the pixels it covers, by covered length), then take the lowest DCT frequencies."""
    edges = np.arange(size + 1, dtype=np.float64)
    low_dct = dct(np.eye(GRID), axis=0, norm="ortho")[:FREQUENCIES]  # (F, GRID)
    out = []
    for start, end in spans:
        cells = np.linspace(start * size, end * size, GRID + 1)
        covered = np.clip(
            np.minimum(cells[1:, None], edges[None, 1:]) - np.maximum(cells[:-1, None], edges[None, :-1]), 0.0, None
        )
        out.append(low_dct @ (covered / covered.sum(axis=1, keepdims=True)))
    return np.stack(out)


def dct_blocks(rgb: np.ndarray, windows: Sequence[Sequence[float]] = WINDOWS) -> np.ndarray:
    """The FREQUENCIES x FREQUENCIES lowest DCT coefficients of each window (left, top, right, bottom as fractions)
    of a picture's luma box-resampled to GRID x GRID: (len(windows), F, F)."""
    height, width = rgb.shape[:2]
    if max(height, width) > MAX_SIDE:
        scale = MAX_SIDE / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize(size, Image.Resampling.BOX))
    grey = luma(rgb).astype(np.float64)
    rows = _projection(grey.shape[0], tuple((float(w[1]), float(w[3])) for w in windows))
    columns = _projection(grey.shape[1], tuple((float(w[0]), float(w[2])) for w in windows))
    blocks: np.ndarray = (rows @ grey) @ np.swapaxes(columns, 1, 2)
    return blocks


def orientations(blocks: np.ndarray, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The D4 views of coefficient blocks (..., F, F) that are canonical (first coefficient across >= first down >= 0),
    within ``margin`` of each block's AC norm: (..., 8, F, F) and a mask (..., 8) of the canonical ones. With
    ``margin=0`` exactly one view of each block is marked (ties go to the first)."""
    views = []
    for base in (blocks, np.swapaxes(blocks, -1, -2)):
        views += [base, base * _ODD, base * _ODD[:, None], base * _ODD[:, None] * _ODD]
    stacked = np.stack(views, axis=-3)
    across, down = stacked[..., 0, 1], stacked[..., 1, 0]
    ac_norm = np.sqrt(np.maximum(np.square(blocks).sum(axis=(-2, -1)) - np.square(blocks[..., 0, 0]), 0.0))
    canonical = np.minimum(np.minimum(across, down), np.abs(across) - np.abs(down)) >= -margin * ac_norm[..., None]
    if margin == 0.0:
        canonical &= np.cumsum(canonical, axis=-1) == 1
    return stacked, canonical


def hash_bits(blocks: np.ndarray) -> np.ndarray:
    """255 bits per block (one per AC coefficient, "above the median"), packed: (..., HASH_BYTES) uint8."""
    ac = blocks.reshape(*blocks.shape[:-2], -1)[..., 1:]
    packed: np.ndarray = np.packbits(ac > np.median(ac, axis=-1, keepdims=True), axis=-1)
    return packed


def canonical_hashes(blocks: np.ndarray) -> bytes:
    """The hash of each block in its canonical orientation, concatenated."""
    views, canonical = orientations(blocks)
    return hash_bits(views[canonical]).tobytes()  # one view per block, in block order


def candidate_hashes(block: np.ndarray, margin: float = VIEW_MARGIN) -> bytes:
    """The hashes of one block in each orientation that may be canonical (within ``margin``), concatenated."""
    views, canonical = orientations(block, margin)
    return hash_bits(views[canonical]).tobytes()


def window_hashes(rgb: np.ndarray, windows: Sequence[Sequence[float]] = WINDOWS) -> bytes:
    """The canonical hash of each window of a picture, concatenated: what the provenance record stores."""
    return canonical_hashes(dct_blocks(rgb, windows))


def view_hashes(rgb: np.ndarray, margin: float = VIEW_MARGIN) -> bytes:
    """The hashes of the whole picture in each orientation that may be canonical: what a scored image is matched by."""
    return candidate_hashes(dct_blocks(rgb, _WHOLE)[0], margin)


def perceptual_hash(image: Image.Image | np.ndarray) -> str:
    """The whole picture's hash as hex, as it stands (not turned to a canonical orientation): one picture whatever its
    size or encoding, for comparing pictures with :func:`lesionnet.contract.provenance.nearest_distances`. A Pillow
    image is decoded as the core decodes (EXIF orientation applied); an array is taken as the RGB pixels."""
    rgb = pil_to_rgb(image) if isinstance(image, Image.Image) else image
    packed: bytes = hash_bits(dct_blocks(rgb, _WHOLE)[0]).tobytes()
    return packed.hex()


@dataclass(frozen=True)
class Fingerprint:
    """One image file: its sha256, its windows' hashes (as recorded) and its whole picture's views (as scored)."""

    sha256: str
    windows: bytes
    views: bytes


def fingerprint(path: str | Path) -> Fingerprint:
    """Fingerprint an image file (decoded once, as the inference core decodes it)."""
    blocks = dct_blocks(read_rgb(path))  # WINDOWS[0] is the whole picture
    return Fingerprint(file_sha256(path), canonical_hashes(blocks), candidate_hashes(blocks[0]))


def fingerprints(paths: Iterable[str | Path]) -> list[Fingerprint]:
    return [fingerprint(path) for path in paths]


def provenance_of(table: pd.DataFrame, splits: Iterable[str] = ("train", "val")) -> Provenance:
    """The provenance record of the images of ``splits`` in a split table (image_id, lesion_id, split, path)."""
    part = table[table["split"].isin(list(splits))]
    prints = fingerprints(part["path"])
    return Provenance(
        image_id=part["image_id"].astype(str).tolist(),
        lesion_id=part["lesion_id"].astype(str).tolist(),
        split=part["split"].astype(str).tolist(),
        sha256=[p.sha256 for p in prints],
        dct_windows=[encode_hashes(p.windows) for p in prints],
    )
