"""The seed project's Keras baseline CNN, registered with timm so it is built like any backbone.

Keras original (64x64x3 input): Conv16-MaxPool, Conv32-MaxPool, Conv64-MaxPool (3x3, 'same', ReLU),
Flatten, Dense512-ReLU, Dropout, Dense7 = 2,124,839 parameters. An adaptive average pool to the
8x8 grid lets it take other input sizes with exactly the same parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

# Per-channel mean/std of HAM10000 images (2,000-image sample of the 200x150 copy, RGB in [0, 1]).
HAM10000_MEAN = (0.764, 0.548, 0.571)
HAM10000_STD = (0.140, 0.152, 0.169)


def _conv_block(in_chs: int, out_chs: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_chs))
    layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    return nn.Sequential(*layers)


class KerasBaselineCNN(nn.Module):
    """Small VGG-style CNN with timm's classifier interface (forward_features / forward_head / reset_classifier)."""

    def __init__(
        self,
        num_classes: int = 7,
        in_chans: int = 3,
        channels: tuple[int, ...] = (16, 32, 64),
        grid_size: int = 8,
        hidden_dim: int = 512,
        drop_rate: float = 0.5,
        batch_norm: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        blocks, prev = [], in_chans
        for chs in channels:
            blocks.append(_conv_block(prev, chs, batch_norm))
            prev = chs
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(grid_size)
        self.fc = nn.Linear(prev * grid_size * grid_size, hidden_dim)
        self.act = nn.ReLU(inplace=True)
        self.head_drop = nn.Dropout(drop_rate)
        self.num_features = self.head_hidden_size = hidden_dim
        self.classifier = nn.Linear(hidden_dim, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        return {"stem": r"^features\.0", "blocks": [(r"^features\.(\d+)", None), (r"^fc", (99999,))]}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x))

    def forward_intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(forward_features(x), each conv block's output): timm's interface, so the image-type gate reads this model's
        stage statistics too."""
        stages = []
        for block in self.features:
            x = block(x)
            stages.append(x)
        return self.pool(x), stages

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.act(self.fc(torch.flatten(x, 1))))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: object) -> dict[str, object]:
    return {
        "url": "",
        "num_classes": 7,
        "input_size": (3, 64, 64),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": HAM10000_MEAN,
        "std": HAM10000_STD,
        "first_conv": "features.0.0",
        "classifier": "classifier",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "lesionnet_baseline.untrained": _cfg(),
        "lesionnet_baseline_bn.untrained": _cfg(),
    }
)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> KerasBaselineCNN:
    return build_model_with_cfg(KerasBaselineCNN, variant, pretrained, **kwargs)


@register_model
def lesionnet_baseline(pretrained: bool = False, **kwargs: object) -> KerasBaselineCNN:
    """The seed's baseline exactly (2,124,839 parameters for 7 classes)."""
    return _create("lesionnet_baseline", pretrained, **kwargs)


@register_model
def lesionnet_baseline_bn(pretrained: bool = False, **kwargs: object) -> KerasBaselineCNN:
    """The baseline with BatchNorm after each convolution: same shape, trains faster and more stably."""
    return _create("lesionnet_baseline_bn", pretrained, batch_norm=True, **kwargs)
