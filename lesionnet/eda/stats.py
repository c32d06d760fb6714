"""Statistics that read the image files: duplicates, sizes, colour, the lesions of the sample grid."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from lesionnet.eda.common import _classes


def duplicate_images(table: pd.DataFrame) -> list[list[str]]:
    """Groups of image_ids whose files are byte-identical (only same-size files are hashed, so it is cheap)."""
    sizes = table["path"].map(lambda p: Path(p).stat().st_size)
    candidates = table[sizes.duplicated(keep=False)]
    digests = candidates["path"].map(lambda p: hashlib.sha1(Path(p).read_bytes()).hexdigest())
    groups = candidates.groupby(digests)["image_id"].agg(sorted)
    return sorted(g for g in groups if len(g) > 1)


def image_sizes(paths: Sequence[str]) -> pd.Series:
    """'WxH' of every image from its header only (no decoding): exact and fast even for the full set."""
    sizes = []
    for path in paths:
        with Image.open(path) as img:
            sizes.append(f"{img.width}x{img.height}")
    return pd.Series(sizes, dtype=str)


def channel_stats(paths: Sequence[str]) -> dict[str, float]:
    """Per-channel mean and std (0-1 scale) pooled over all pixels of ``paths``, like a normalisation would use."""
    total, total_sq, count = np.zeros(3), np.zeros(3), 0
    for path in paths:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
        total += pixels.sum(axis=0)
        total_sq += np.square(pixels).sum(axis=0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return {
        "images read": len(paths),
        **{f"{c} mean": m for c, m in zip("RGB", mean, strict=True)},
        **{f"{c} std": s for c, s in zip("RGB", std, strict=True)},
    }


def grid_images(table: pd.DataFrame, columns: int, seed: int) -> dict[str, list[str]]:
    """Per class, the first image of up to ``columns`` random lesions: one per lesion, so no near-duplicates."""
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[str]] = {}
    for dx in _classes(table):
        rows = table[table["dx"] == dx].sort_values("image_id")
        lesions = rows["lesion_id"].drop_duplicates().to_numpy()
        picked = rng.choice(lesions, size=min(columns, len(lesions)), replace=False)
        first = rows.drop_duplicates("lesion_id").set_index("lesion_id")["path"]
        chosen[dx] = [first[lesion] for lesion in picked]
    return chosen
