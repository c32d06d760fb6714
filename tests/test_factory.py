"""Pretrained weights: local files load through timm, and offline without a copy fails fast and clearly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from lesionnet.models import factory
from lesionnet.models.factory import PretrainedWeightsError, build_backbone


def test_pretrained_file_loads_backbone_and_resets_classifier(tmp_path: Path) -> None:
    source = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    path = tmp_path / "resnet18.safetensors"
    save_file(source.state_dict(), str(path))
    model = build_backbone("resnet18.a1_in1k", num_classes=7, pretrained=True, pretrained_file=str(path))
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 7


def test_offline_without_weights_fails_within_seconds_naming_both_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(factory, "cached_hub_file", lambda hub_id: None)
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsError, match=r"model\.pretrained_file=.*model\.pretrained=false"):
        build_backbone("densenet201.tv_in1k", num_classes=7, pretrained=True)
    assert time.perf_counter() - start < 10


def test_hub_cache_hit_loads_from_the_cached_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(path))
    monkeypatch.setattr(factory, "cached_hub_file", lambda hub_id: path if hub_id == "timm/resnet18.a1_in1k" else None)
    model = build_backbone("resnet18.a1_in1k", num_classes=7, pretrained=True)
    torch.testing.assert_close(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_missing_pretrained_file_and_inconsistent_flags_are_errors(tmp_path: Path) -> None:
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        build_backbone("resnet18", 7, pretrained=True, pretrained_file=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="set model.pretrained=true"):
        build_backbone("resnet18", 7, pretrained=False, pretrained_file=str(tmp_path / "x.pth"))
