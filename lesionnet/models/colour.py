"""Colour constancy as the network's first layer, so training, evaluation, the app and the ONNX graph share it.

Dermatoscopes differ in light source and sensor: the same lesion comes out warmer, bluer or darker from one clinic to
the next. Shades of Gray (Finlayson & Trezzi 2004; p = 6 in the top ISIC 2018/2019 entries) estimates each image's
illuminant as the Minkowski p-mean of every channel and rescales the channels so that it becomes grey.

The layer runs on the normalised batch the model receives (it undoes the mean/std, corrects, normalises again), so it
is part of every forward pass, on the very crop the model sees, and needs nothing from the runtime that feeds the
graph. Its settings live in the checkpoint's data config (``data_config["colour_constancy"]``); a checkpoint without
them has no such layer and keeps its old preprocessing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lesionnet.data.transforms import check_colour_constancy


class ShadesOfGray(nn.Module):
    """Per-image illuminant estimate ``(mean(I^p))^(1/p)`` per channel, divided out (scaled so grey stays grey).

    ``gamma`` (optional) first applies ``I^(1/gamma)``, as in Barata et al.'s recipe. Values are clipped to [0, 1]
    like the uint8 images the reference implementations produce.
    """

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], power: float = 6.0, gamma: float | None = None
    ) -> None:
        super().__init__()
        self.power = float(power)
        self.gamma = None if gamma is None else float(gamma)
        # Not persistent: rebuilt from the data config, so the state dict of a model is the same with or without it.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rgb = (images * self.std + self.mean).clamp(0.0, 1.0)
        if self.gamma is not None:
            rgb = rgb.clamp_min(1e-6).pow(1.0 / self.gamma)
        illuminant = rgb.pow(self.power).mean(dim=(2, 3), keepdim=True).clamp_min(1e-12).pow(1.0 / self.power)
        illuminant = illuminant / torch.linalg.vector_norm(illuminant, dim=1, keepdim=True).clamp_min(1e-12)
        corrected = (rgb / (illuminant * math.sqrt(3.0)).clamp_min(1e-6)).clamp(0.0, 1.0)
        return (corrected - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"power={self.power}, gamma={self.gamma}"


def build_colour_constancy(data_config: Mapping[str, Any] | None) -> nn.Module:
    """The layer a data config asks for (``colour_constancy``), or an identity when it asks for none."""
    config = check_colour_constancy((data_config or {}).get("colour_constancy"))
    if config is None:
        return nn.Identity()
    return ShadesOfGray(data_config["mean"], data_config["std"], config["power"], config["gamma"])  # type: ignore[index]
