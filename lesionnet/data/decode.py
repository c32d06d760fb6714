"""The one image decoder: files on disk (training, evaluation) and uploads (the app) become RGB the same way.

Decoding goes through Pillow, which raises on truncated files where OpenCV would return a partly grey image. EXIF
orientation is applied everywhere: phones store portrait photos sideways with a rotation tag, and a model must see
the photo as the person took it; HAM10000's files carry no rotation tag, so training images are unchanged by it.
16-bit greyscale (PNG mode ``I;16``/``I``) is scaled to 8 bits instead of being clipped to white by Pillow's
``convert("RGB")``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from lesionnet.data.metadata import DatasetError

WIDE_INTEGER_MODES: tuple[str, ...] = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A decoded Pillow image -> upright (H, W, 3) uint8 RGB array."""
    upright = ImageOps.exif_transpose(image)
    if upright.mode in WIDE_INTEGER_MODES:
        wide = np.asarray(upright, dtype=np.float64)
        scale = 65535.0 if wide.max() > 255 or upright.mode.startswith("I;16") else 255.0
        grey = np.clip(np.rint(wide * (255.0 / scale)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(upright.convert("RGB"))


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file fully to an upright RGB uint8 array; a damaged file stops with its path and the fix."""
    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_rgb(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(
            f"Cannot decode image {path}: {err}. Replace it with the original file (re-download the "
            "dataset) or delete its row from the metadata CSV."
        ) from err
