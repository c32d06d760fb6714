"""Grad-CAM heatmaps (pytorch-grad-cam) on the last spatial feature map of any timm backbone, as PNGs.

The target layer is found by tracing one forward pass rather than by model-specific names, so the baseline CNN,
EfficientNet-Lite and the other timm backbones all work: it is the last module, in execution order, whose output is
a feature map larger than 1x1 (pooling layers excluded, since they only resample the map before them).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from lesionnet.inference import eval_crop_box


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


def png_base64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass(frozen=True)
class CamResult:
    heatmap_png: str  # RGBA: jet colours, transparent where the map is cold (to lay over the photo)
    overlay_png: str  # RGB: the model's view of the photo with the heatmap blended in
    width: int
    height: int
    crop_box: list[float]  # the model's view inside the upload: left, top, right, bottom as fractions
    layer: str


class CamExplainer:
    """Grad-CAM for one member of a predictor, the target layer found once at start-up."""

    def __init__(self, model: nn.Module, data_config: Mapping[str, Any], display_size: int = 256) -> None:
        self.model = model
        self.data_config = dict(data_config)
        self.layer_name, self.layer = find_target_layer(model, tuple(data_config["input_size"]))
        self.display_size = display_size

    def explain(self, image: np.ndarray, x: torch.Tensor, class_index: int) -> CamResult:
        """Heatmap of ``class_index`` for input ``x`` (preprocessed ``image``), mapped back onto ``image``."""
        x = x.detach().clone().requires_grad_(True)  # gradients reach the map even through frozen layers
        with GradCAM(model=self.model, target_layers=[self.layer]) as cam:
            mask = cam(input_tensor=x, targets=[ClassifierOutputTarget(class_index)])[0]
        height, width = image.shape[:2]
        left, top, right, bottom = eval_crop_box(self.data_config, width, height)
        view = image[round(top) : round(bottom), round(left) : round(right)]
        scale = self.display_size / max(view.shape[:2])
        size = (max(1, round(view.shape[1] * scale)), max(1, round(view.shape[0] * scale)))
        view = cv2.resize(view, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        mask = np.clip(cv2.resize(np.nan_to_num(mask.astype(np.float32)), size, interpolation=cv2.INTER_LINEAR), 0, 1)
        colours = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * mask), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
        heat = np.dstack([colours, np.uint8(200 * mask)])
        overlay = show_cam_on_image(view.astype(np.float32) / 255.0, mask, use_rgb=True, image_weight=0.6)
        return CamResult(
            heatmap_png=png_base64(heat),
            overlay_png=png_base64(overlay),
            width=size[0],
            height=size[1],
            crop_box=[left / width, top / height, right / width, bottom / height],
            layer=self.layer_name,
        )
