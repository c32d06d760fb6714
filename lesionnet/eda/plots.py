"""Figure helpers of the EDA report: Agg figures outside pyplot, PNG output, thumbnails."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageOps

DPI = 100
THUMB_SIZE = (96, 72)  # (width, height) of a grid cell: HAM10000 images are 4:3


def _figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas, outside pyplot: nothing global is left open, so nothing leaks."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path, palette: bool = False) -> str:
    """Write the figure and free it; returns the file name for a relative Markdown link.

    ``palette`` stores photos as a 256-colour PNG: a third of the size of full RGB, with no visible loss.
    """
    if palette:
        fig.canvas.draw()
        rgb = np.asarray(cast(FigureCanvasAgg, fig.canvas).buffer_rgba())[..., :3]  # attached by _figure
        Image.fromarray(rgb).quantize(256).save(path, optimize=True)
    else:
        fig.savefig(path, dpi=DPI)
    fig.clear()
    return path.name


def _image(name: str, alt: str) -> str:
    return f"![{alt}]({name})"


def _share_plot(counts: pd.DataFrame, path: Path, title: str) -> str:
    """Stacked 100 % bars per class: compares the mix across classes of very different sizes."""
    share = counts.div(counts.sum(axis=1), axis=0) * 100
    fig = _figure(6.4, 0.3 * len(share) + 1.2)
    ax = fig.subplots()
    left = np.zeros(len(share))
    for column in share.columns:
        ax.barh(share.index, share[column], left=left, label=column)
        left += share[column].to_numpy()
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of the class's images")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)
    return _save(fig, path)


def _thumbnail(path: str, size: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as img:
        img.draft("RGB", (size[0] * 2, size[1] * 2))  # JPEG: decode at reduced scale, much faster on big files
        return np.asarray(ImageOps.pad(img.convert("RGB"), size, color=(255, 255, 255)))
