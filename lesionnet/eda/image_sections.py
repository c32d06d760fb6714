"""Report sections on the images themselves: sizes and colour statistics, and the sample grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lesionnet.eda.common import _classes, _md, _pct, _sample_per_class
from lesionnet.eda.plots import DPI, THUMB_SIZE, _figure, _image, _save, _thumbnail
from lesionnet.eda.stats import channel_stats, grid_images, image_sizes


def section_image_stats(table: pd.DataFrame, images_per_class: int, seed: int) -> str:
    """Image sizes (all headers) and per-class colour statistics (a bounded sample), for preprocessing choices."""
    sizes = image_sizes(table["path"].tolist()).value_counts()
    size_df = pd.DataFrame({"images": sizes, "%": _pct(sizes, sizes.sum())})
    size_df.index.name = "width x height"
    sample = _sample_per_class(table, images_per_class, seed)
    rows = {c: channel_stats(sample.loc[sample["dx"] == c, "path"].tolist()) for c in _classes(table)}
    rows["all (sample)"] = channel_stats(sample["path"].tolist())
    colour = pd.DataFrame.from_dict(rows, orient="index")
    colour["images read"] = colour["images read"].astype(int)
    colour.index.name = "dx"
    sampled = len(sample) < len(table)
    how = (
        f"a random sample of up to {images_per_class} images per class (seed {seed}; {len(sample):,} of "
        f"{len(table):,} images)"
        if sampled
        else f"all {len(table):,} images"
    )
    return "\n".join(
        [
            "## Image size and colour",
            "",
            f"Image sizes, from every file's header ({len(table):,} images):",
            "",
            _md(size_df),
            "",
            f"Per-channel mean and standard deviation of pixel values (0-1 scale), pooled over the pixels of {how}. "
            "The `all (sample)` row weights classes by the sample, not by the dataset.",
            "",
            _md(colour, floatfmt=".3f"),
        ]
    )


def section_sample_grid(table: pd.DataFrame, out_dir: Path, columns: int, seed: int) -> str:
    """What the classes look like: one thumbnail per lesion, so the grid has no near-duplicates."""
    chosen = grid_images(table, columns, seed)
    w, h = THUMB_SIZE
    mosaic = np.full((h * len(chosen), w * columns, 3), 255, dtype=np.uint8)
    for r, paths in enumerate(chosen.values()):
        for c, path in enumerate(paths):
            mosaic[r * h : (r + 1) * h, c * w : (c + 1) * w] = _thumbnail(path, THUMB_SIZE)
    fig = _figure(mosaic.shape[1] / DPI + 0.7, mosaic.shape[0] / DPI + 0.1)
    ax = fig.subplots()
    ax.imshow(mosaic, interpolation="none")
    ax.set_yticks([(r + 0.5) * h for r in range(len(chosen))], list(chosen))
    ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    plot = _save(fig, out_dir / "sample_grid.png", palette=True)
    return "\n".join(
        [
            "## Sample images",
            "",
            f"Up to {columns} random lesions per class (seed {seed}), one image each, shown at {w}x{h} px.",
            "",
            _image(plot, "sample images per class"),
        ]
    )
