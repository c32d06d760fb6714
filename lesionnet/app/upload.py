"""Turn untrusted upload bytes into an RGB array, or a clear 4xx error: never a crash, never a decompression bomb.

Only the formats a browser or phone camera produces are opened; the pixels then go through the project's one decoder
(``lesionnet.data.decode``: EXIF orientation applied, 16-bit greyscale scaled), the same as for the files evaluate.py
scores, so the app serves what was evaluated.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from lesionnet.data.decode import pil_to_rgb

ALLOWED_TYPES: dict[str, str] = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on one upload: bytes on the wire, decoded pixels (width x height), the shortest side, the longest wait
    for the next piece of its body and the longest time for the whole body after the request's headers (None: wait
    for ever)."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    min_side: int = 32
    body_timeout_s: float | None = 15.0
    body_deadline_s: float | None = 120.0


class UploadError(Exception):
    """An input the API refuses; ``status`` is the HTTP code and ``code`` a stable machine-readable name."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def guard_pillow(limits: UploadLimits) -> None:
    """Make Pillow refuse oversized images at open time (header only) instead of warning and decoding them.

    Process-wide on purpose: set once at start-up, so no per-request warning state is touched from threads.
    """
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def check_content_type(content_type: str | None) -> None:
    media = (content_type or "").split(";")[0].strip().lower()
    if media not in ALLOWED_TYPES:
        raise UploadError(
            415, "unsupported_media_type", f"Upload a JPEG, PNG or WebP image (got content type '{media or 'none'}')."
        )


def check_single_file(parts: Sequence[object], field: str = "file") -> None:
    """Exactly one form part named ``field`` (``parts``: all of them): with two, FastAPI would silently analyse the
    last one."""
    if len(parts) > 1:
        raise UploadError(
            422, "too_many_files", f"Send one photo per request: this one has {len(parts)} parts named '{field}'."
        )


def decode_image(data: bytes, limits: UploadLimits) -> np.ndarray:
    """Fully decode ``data`` to an (H, W, 3) uint8 RGB array within ``limits``."""
    if not data:
        raise UploadError(400, "empty_file", "The uploaded file is empty.")
    if len(data) > limits.max_bytes:
        raise UploadError(413, "file_too_large", f"The file is larger than {limits.max_bytes // (1024 * 1024)} MB.")
    too_many = UploadError(
        413, "too_many_pixels", f"The image has more than {limits.max_pixels:,} pixels; resize it and try again."
    )
    try:
        with Image.open(io.BytesIO(data), formats=list(ALLOWED_TYPES.values())) as img:
            if img.width * img.height > limits.max_pixels:
                raise too_many
            img.load()
            rgb = pil_to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise too_many from err
    except UnidentifiedImageError as err:
        raise UploadError(422, "not_an_image", "The file is not a JPEG, PNG or WebP image.") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # truncated or corrupt data
        raise UploadError(422, "corrupt_image", "The image file is damaged or incomplete; upload it again.") from err
    height, width = rgb.shape[:2]
    if min(height, width) < limits.min_side:
        raise UploadError(
            422,
            "image_too_small",
            f"The image is too small ({width}x{height}); it needs at least {limits.min_side} pixels on each side.",
        )
    return rgb
