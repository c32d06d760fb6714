"""A cheap, model-free check that an image could be a close-up of a skin lesion, run before the classifier.

A classifier's softmax is known to be over-confident on inputs unlike its training data (Hendrycks & Gimpel 2017),
so blank, synthetic and noisy images are refused on image statistics instead. The statistics are computed on a
copy shrunk to at most 128 px (fast and independent of resolution). Thresholds were set with a margin outside
the range of all 10,015 HAM10000 images (200x150 copy; a 5% sample of the 600x450 originals agrees), so a
dermatoscopic image should not be refused by them. Natural photos (faces, rooms) pass: this check is not a
lesion detector, only a guard against blank, synthetic and broken inputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class CheckThresholds:
    """Refusal thresholds; each names a property every real dermatoscopic image has."""

    min_contrast: float = 3.0  # std of grey levels (0-255); HAM10000 min 4.7: (nearly) one flat colour
    min_brightness: float = 30.0  # mean grey level (HAM10000 min 58): a black / lens-cap image
    max_brightness: float = 240.0  # (HAM10000 max 230): a blown-out / blank white image
    max_blank_fraction: float = 0.6  # share of near-black or near-white pixels (HAM10000 max 0.34)
    min_smoothness: float = 0.4  # neighbour correlation (HAM10000 min 0.59): noise and fine stripes are lower
    max_flat_edges: float = 15.0  # flat-area share x contrast (HAM10000 max 11.3): blocks, stripes, drawings
    max_saturation: float = 0.9  # mean HSV saturation 0-1 (HAM10000 max 0.71): neon or pure synthetic colours


@dataclass(frozen=True)
class ImageCheck:
    passed: bool
    reasons: list[str]
    stats: dict[str, float]


# How the statistics are taken; the on-device page (static/ondevice.js) computes the same ones with these numbers
STATS_PARAMS: dict[str, int] = {
    "max_side": 128,  # statistics on a copy shrunk (area interpolation) to at most this many pixels a side
    "blank_dark": 16,  # a pixel whose brightest channel is below this is near-black
    "blank_bright": 240,  # ... whose darkest channel is above this, near-white
    "flat_gradient": 4,  # a Sobel gradient magnitude below this is a flat area
}
# (statistic, "<" or ">", threshold field, reason): refused when the comparison holds. One table for the server and
# the on-device page (it receives it in /on-device/policy.json).
RULES: tuple[tuple[str, str, str, str], ...] = (
    ("contrast", "<", "min_contrast", "The image is almost one flat colour."),
    ("brightness", "<", "min_brightness", "The image is too dark."),
    ("brightness", ">", "max_brightness", "The image is too bright (overexposed)."),
    ("blank_fraction", ">", "max_blank_fraction", "Most of the image is black or white."),
    ("smoothness", "<", "min_smoothness", "The image looks like noise or a fine pattern, not a photo."),
    ("flat_edges", ">", "max_flat_edges", "Flat blocks of colour: it looks like a drawing or pattern."),
    ("saturation", ">", "max_saturation", "The colours are far too saturated for skin."),
)


def image_stats(rgb: np.ndarray) -> dict[str, float]:
    """The statistics the check uses, on an area-downsampled copy."""
    h, w = rgb.shape[:2]
    p = STATS_PARAMS
    scale = min(1.0, p["max_side"] / max(h, w))
    small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float64)
    blank = (small.max(axis=2) < p["blank_dark"]) | (small.min(axis=2) > p["blank_bright"])
    smooth = [_neighbour_corr(grey[:, :-1], grey[:, 1:]), _neighbour_corr(grey[:-1], grey[1:])]
    grad = np.hypot(cv2.Sobel(grey, cv2.CV_64F, 1, 0), cv2.Sobel(grey, cv2.CV_64F, 0, 1))
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
    return {
        "contrast": float(grey.std()),
        "brightness": float(grey.mean()),
        "blank_fraction": float(blank.mean()),
        "smoothness": float(min(smooth)),
        # Real skin has texture everywhere; graphics are flat regions joined by strong edges.
        "flat_edges": float((grad < p["flat_gradient"]).mean() * grey.std()),
        "saturation": float(hsv[..., 1].mean() / 255.0),
    }


def _neighbour_corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 1.0  # a constant image is "smooth"; contrast catches it


def check_image(rgb: np.ndarray, thresholds: CheckThresholds | None = None) -> ImageCheck:
    """Pass, or refuse with the plain reasons (several may apply)."""
    t = thresholds_dict(thresholds)
    s = image_stats(rgb)
    reasons = [text for stat, op, name, text in RULES if (s[stat] < t[name] if op == "<" else s[stat] > t[name])]
    return ImageCheck(passed=not reasons, reasons=reasons, stats={k: round(v, 4) for k, v in s.items()})


def thresholds_dict(thresholds: CheckThresholds | None = None) -> dict[str, float]:
    return asdict(thresholds or CheckThresholds())


def check_spec(thresholds: CheckThresholds | None = None) -> dict[str, object]:
    """The whole check as data, for the on-device page: how to take the statistics, the thresholds and the rules."""
    return {
        "params": dict(STATS_PARAMS),
        "thresholds": thresholds_dict(thresholds),
        "rules": [{"stat": stat, "op": op, "threshold": name, "reason": text} for stat, op, name, text in RULES],
    }
