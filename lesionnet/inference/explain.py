"""Heatmaps of what the model looked at, as small grids in [0, 1]: the class activation map of the forward pass
(``Prediction.cams``, heads that are average-pool + linear) or Grad-CAM (pytorch-grad-cam, the app extra) on the last
spatial feature map of any timm backbone. :func:`unit_grid` is also the exported ONNX graph's reference
(``lesionnet.export``), so the on-device heatmap is scaled as the server's.

For Grad-CAM the target layer is found by tracing one forward pass rather than by model-specific names, so the
baseline CNN, EfficientNet-Lite and the other timm backbones all work: it is the last module, in execution order,
whose output is a feature map larger than 1x1 (pooling layers excluded, since they only resample the map before them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from lesionnet.data.transforms import eval_crop_box


def find_target_layer(model: nn.Module, input_size: tuple[int, int, int] | list[int]) -> tuple[str, nn.Module]:
    """(name, module) of the last non-pooling module producing a (N, C, H, W) map with H, W > 1."""
    seen: list[tuple[str, nn.Module]] = []

    def record(name: str) -> Any:
        def hook(module: nn.Module, _inp: Any, out: Any) -> None:
            if (
                isinstance(out, torch.Tensor)
                and out.ndim == 4
                and min(out.shape[-2:]) > 1
                and "pool" not in type(module).__name__.lower()
            ):
                seen.append((name, module))

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise ValueError(f"{type(model).__name__} has no spatial feature map for Grad-CAM.")
    return seen[-1]


MAX_GRID = 16  # Grad-CAM masks (input-sized) are sent at most this many cells a side; the page smooths them


@dataclass(frozen=True)
class Heatmap:
    """What the page needs to draw the explanation: a small grid in [0, 1] and where the model looked."""

    method: str  # "cam" (from the forward pass) | "gradcam" (an extra backward pass)
    grid: list[list[float]]  # rows x columns, 1 = the strongest evidence for the explained class
    crop_box: list[float]  # the model's view inside the upload: left, top, right, bottom as fractions
    class_code: str
    layer: str


def unit_grid(values: np.ndarray) -> list[list[float]]:
    """ReLU and scale to [0, 1] (as Grad-CAM does), 3 decimals: a few hundred bytes of JSON."""
    positive = np.maximum(np.nan_to_num(values.astype(np.float64)), 0.0)
    peak = positive.max()
    return np.round(positive / peak if peak > 0 else positive, 3).tolist()


def view_box(data_config: Mapping[str, Any], image: np.ndarray) -> list[float]:
    height, width = image.shape[:2]
    left, top, right, bottom = eval_crop_box(data_config, width, height)
    return [left / width, top / height, right / width, bottom / height]


class GradCamExplainer:
    """Grad-CAM for members whose head is not average-pool + linear (there the forward pass's CAM is used)."""

    def __init__(self, model: nn.Module, data_config: Mapping[str, Any]) -> None:
        self.model = model
        self.data_config = dict(data_config)
        self.layer_name, self.layer = find_target_layer(model, tuple(data_config["input_size"]))

    def explain(self, image: np.ndarray, x: torch.Tensor, class_index: int, class_code: str) -> Heatmap:
        """Heatmap of ``class_index`` for input ``x`` (preprocessed ``image``)."""
        x = x.detach().clone().requires_grad_(True)  # gradients reach the map even through frozen layers
        with GradCAM(model=self.model, target_layers=[self.layer]) as cam:
            mask = cam(input_tensor=x, targets=[ClassifierOutputTarget(class_index)])[0]
        rows, columns = mask.shape
        scale = min(1.0, MAX_GRID / max(rows, columns))
        small = cv2.resize(
            mask.astype(np.float32),
            (max(1, round(columns * scale)), max(1, round(rows * scale))),
            interpolation=cv2.INTER_AREA,
        )
        return Heatmap("gradcam", unit_grid(small), view_box(self.data_config, image), class_code, self.layer_name)


def cam_heatmap(
    cams: np.ndarray, class_index: int, class_code: str, data_config: Mapping[str, Any], image: np.ndarray
) -> Heatmap:
    """The class activation map of the forward pass (``Prediction.cams``) as a heatmap: no backward pass."""
    return Heatmap("cam", unit_grid(cams[class_index]), view_box(data_config, image), class_code, "forward_features")
