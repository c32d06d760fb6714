"""Albumentations pipelines whose size, interpolation and normalisation come from the timm data config.

The eval pipeline mirrors timm's: resize by 1/crop_pct, then centre-crop to the model's input size.
Dermoscopy has no canonical orientation, so flips and 90-degree rotations are label-preserving.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import timm
from albumentations.pytorch import ToTensorV2

from lesionnet.data.vignette import DermatoscopeField

INTERPOLATIONS: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


COLOUR_CONSTANCY_METHODS: tuple[str, ...] = ("shades_of_gray",)


def to_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """Accept 96, [96], [96, 128] or a timm input_size (3, 96, 128) and return (height, width)."""
    size = [int(image_size)] if isinstance(image_size, int) else [int(s) for s in image_size]
    if len(size) == 3:
        size = size[1:]
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be N, [H, W] or [C, H, W] with positive sizes, got {image_size!r}.")
    return size[0], size[1]


def check_colour_constancy(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``{method: shades_of_gray, power: 6, gamma: null}`` checked and completed; None/empty = off."""
    if not config:
        return None
    unknown = sorted(set(config) - {"method", "power", "gamma"})
    if unknown:
        raise ValueError(f"data.colour_constancy: unknown keys {unknown}; use method, power and gamma.")
    method = config.get("method", "shades_of_gray")
    if method not in COLOUR_CONSTANCY_METHODS:
        raise ValueError(
            f"data.colour_constancy.method must be one of {list(COLOUR_CONSTANCY_METHODS)}, got '{method}'."
        )
    power = float(config.get("power", 6.0))
    if not 1.0 <= power <= 16.0:
        raise ValueError(
            f"data.colour_constancy.power must be in [1, 16] (1 = grey world, 6 = the ISIC entries), got {power}."
        )
    gamma = config.get("gamma")
    if gamma is not None and not 0.1 <= float(gamma) <= 10.0:
        raise ValueError(f"data.colour_constancy.gamma must be null or in [0.1, 10], got {gamma}.")
    return {"method": method, "power": power, "gamma": None if gamma is None else float(gamma)}


def resolve_data_config(
    backbone: str,
    image_size: int | Sequence[int] | None = None,
    crop_pct: float | None = None,
    colour_constancy: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The backbone's timm pretrained data config (size, mean/std, interpolation, crop_pct), with overrides.

    Read from timm's registry without building the model, so data and model agree by construction.
    ``colour_constancy`` is recorded here (and only when set) because the model's first layer applies it
    (``lesionnet.models.colour``): a checkpoint's data config is its whole preprocessing.
    """
    try:
        pretrained_cfg = timm.models.get_pretrained_cfg(backbone, allow_unregistered=False)
    except RuntimeError as err:
        raise ValueError(f"Unknown timm model '{backbone}' ({err}). See timm.list_models().") from err
    assert pretrained_cfg is not None  # allow_unregistered=False raises instead of returning None
    cfg = timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict())
    if image_size is not None:
        cfg["input_size"] = (3, *to_hw(image_size))
    if crop_pct is not None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
        cfg["crop_pct"] = float(crop_pct)
    cfg["input_size"] = tuple(int(s) for s in cfg["input_size"])
    cfg["mean"] = tuple(float(m) for m in cfg["mean"])
    cfg["std"] = tuple(float(s) for s in cfg["std"])
    colour = check_colour_constancy(colour_constancy)
    if colour is not None:
        cfg["colour_constancy"] = colour
    return cfg


def _interp(data_config: Mapping[str, Any]) -> int:
    name = data_config.get("interpolation", "bilinear")
    if name not in INTERPOLATIONS:
        raise ValueError(f"Unsupported interpolation '{name}'; use one of {sorted(INTERPOLATIONS)}.")
    return INTERPOLATIONS[name]


def _normalize(data_config: Mapping[str, Any]) -> list[A.BasicTransform]:
    return [A.Normalize(mean=data_config["mean"], std=data_config["std"], max_pixel_value=255.0), ToTensorV2()]


def eval_crop_box(data_config: Mapping[str, Any], width: int, height: int) -> tuple[float, float, float, float]:
    """The region (left, top, right, bottom, in original pixels) of a ``width`` x ``height`` image that
    :func:`build_eval_transform` keeps: what the model sees, for drawing heatmaps back onto the photo."""
    h, w = to_hw(data_config["input_size"])
    crop_pct = float(data_config.get("crop_pct", 1.0))
    if h == w:
        scale_y = scale_x = math.floor(h / crop_pct) / min(width, height)
    else:
        scale_y, scale_x = math.floor(h / crop_pct) / height, math.floor(w / crop_pct) / width
    left, top = (width * scale_x - w) / 2 / scale_x, (height * scale_y - h) / 2 / scale_y
    return max(0.0, left), max(0.0, top), min(width, left + w / scale_x), min(height, top + h / scale_y)


def build_eval_transform(data_config: Mapping[str, Any]) -> A.Compose:
    """timm-style eval: scale so the crop keeps ``crop_pct`` of the image, centre-crop, normalise."""
    h, w = to_hw(data_config["input_size"])
    crop_pct = float(data_config.get("crop_pct", 1.0))
    interp = _interp(data_config)
    if h == w:
        resize = A.SmallestMaxSize(max_size=math.floor(h / crop_pct), interpolation=interp)
    else:
        resize = A.Resize(math.floor(h / crop_pct), math.floor(w / crop_pct), interpolation=interp)
    return A.Compose([resize, A.CenterCrop(h, w), *_normalize(data_config)])


ACQUISITION_KEYS: tuple[str, ...] = ("gamma", "field", "downscale", "blur", "jpeg")


def _range(value: Sequence[float]) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    return low, high


def acquisition_ops(acquisition: Mapping[str, Mapping[str, Any]]) -> list[A.BasicTransform]:
    """What another dermatoscope, camera or upload path does to an image, as albumentations transforms, in the order
    light and optics act before the file is written: gamma, the dark circular field, lower resolution (down- then
    up-scaled), Gaussian or motion blur, JPEG re-encoding. Each entry is ``{p: ..., <its range>: [low, high]}``.
    No hair-like occluder: albumentations (2.0.8) has none (its dropouts cut rectangles), and issue 21 asked for one
    only if it did."""
    unknown = sorted(set(acquisition) - set(ACQUISITION_KEYS))
    if unknown:
        raise ValueError(f"data.augment.acquisition: unknown entries {unknown}; use {list(ACQUISITION_KEYS)}.")
    ops: list[A.BasicTransform] = []
    for name in ACQUISITION_KEYS:
        settings = dict(acquisition.get(name) or {})
        if not settings:
            continue
        p = float(settings.pop("p", 0.5))
        try:
            if name == "gamma":
                ops.append(A.RandomGamma(gamma_limit=_range(settings.pop("limit", (70, 150))), p=p))
            elif name == "field":
                ops.append(DermatoscopeField(**settings, p=p))  # radius_range, edge_range, outside_range, centre_shift
                settings = {}
            elif name == "downscale":
                ops.append(A.Downscale(scale_range=_range(settings.pop("scale", (0.35, 0.9))), p=p))
            elif name == "blur":
                limit = tuple(int(v) for v in settings.pop("limit", (3, 7)))
                ops.append(A.OneOf([A.GaussianBlur(blur_limit=limit), A.MotionBlur(blur_limit=limit)], p=p))
            elif name == "jpeg":
                quality = tuple(int(v) for v in settings.pop("quality", (30, 95)))
                ops.append(A.ImageCompression(quality_range=quality, p=p))
        except (TypeError, ValueError) as err:
            raise ValueError(f"data.augment.acquisition.{name}: {err}") from err
        if settings:
            raise ValueError(f"data.augment.acquisition.{name}: unknown settings {sorted(settings)}.")
    return ops


def build_train_transform(
    data_config: Mapping[str, Any],
    scale: Sequence[float] = (0.5, 1.0),
    hflip: float = 0.5,
    vflip: float = 0.5,
    rot90: float = 0.5,
    rotate_degrees: float = 0.0,
    color_jitter: Mapping[str, float] | None = None,
    acquisition: Mapping[str, Mapping[str, Any]] | None = None,
) -> A.Compose:
    """Random resized crop to the model's input size plus orientation, colour and acquisition augmentation.

    Rotations come first (a 90-degree turn of a 4:3 image changes its shape; the crop then fixes it).
    ``acquisition`` (:func:`acquisition_ops`) imitates other dermatoscopes and cameras.
    """
    h, w = to_hw(data_config["input_size"])
    interp = _interp(data_config)
    aspect = w / h
    ops: list[A.BasicTransform] = []
    if rot90 > 0:
        ops.append(A.RandomRotate90(p=rot90))
    if rotate_degrees > 0:
        ops.append(
            A.Affine(
                rotate=(-rotate_degrees, rotate_degrees),
                border_mode=cv2.BORDER_REFLECT_101,
                interpolation=interp,
                p=0.5,
            )
        )
    ops.append(
        A.RandomResizedCrop(
            size=(h, w), scale=tuple(scale), ratio=(aspect * 3 / 4, aspect * 4 / 3), interpolation=interp
        )
    )
    if hflip > 0:
        ops.append(A.HorizontalFlip(p=hflip))
    if vflip > 0:
        ops.append(A.VerticalFlip(p=vflip))
    if color_jitter:
        jitter = dict(color_jitter)
        ops.append(
            A.ColorJitter(
                brightness=jitter.get("brightness", 0.0),
                contrast=jitter.get("contrast", 0.0),
                saturation=jitter.get("saturation", 0.0),
                hue=jitter.get("hue", 0.0),
                p=jitter.get("p", 0.8),
            )
        )
    ops.extend(acquisition_ops(acquisition or {}))
    return A.Compose([*ops, *_normalize(data_config)])
