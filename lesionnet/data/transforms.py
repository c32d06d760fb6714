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

INTERPOLATIONS: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


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


def resolve_data_config(
    backbone: str, image_size: int | Sequence[int] | None = None, crop_pct: float | None = None
) -> dict[str, Any]:
    """The backbone's timm pretrained data config (size, mean/std, interpolation, crop_pct), with overrides.

    Read from timm's registry without building the model, so data and model agree by construction.
    """
    try:
        pretrained_cfg = timm.models.get_pretrained_cfg(backbone, allow_unregistered=False)
    except RuntimeError as err:
        raise ValueError(f"Unknown timm model '{backbone}' ({err}). See timm.list_models().") from err
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


def build_train_transform(
    data_config: Mapping[str, Any],
    scale: Sequence[float] = (0.5, 1.0),
    hflip: float = 0.5,
    vflip: float = 0.5,
    rot90: float = 0.5,
    rotate_degrees: float = 0.0,
    color_jitter: Mapping[str, float] | None = None,
) -> A.Compose:
    """Random resized crop to the model's input size plus orientation and colour augmentation.

    Rotations come first (a 90-degree turn of a 4:3 image changes its shape; the crop then fixes it).
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
    return A.Compose([*ops, *_normalize(data_config)])
