"""Shades of Gray colour constancy: the published algorithm, inside the model, recorded in the checkpoint's data
config, so training, evaluation, the app and the exported graph apply it identically (issue 21, item 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lesionnet.data.transforms import build_eval_transform, resolve_data_config
from lesionnet.export import export, sample_batch
from lesionnet.inference import Predictor, forward, load_member, resolve_checkpoints
from lesionnet.models.colour import ShadesOfGray, build_colour_constancy
from lesionnet.module import LesionClassifier
from tests.test_app import lesion_like

SOG = {"method": "shades_of_gray", "power": 6, "gamma": None}


def shades_of_gray_reference(image: np.ndarray, power: float = 6.0, gamma: float | None = None) -> np.ndarray:
    """The published recipe on a uint8 image (Barata et al.; the ISIC 2018/2019 entries), in float64."""
    rgb = image.astype(np.float64) / 255.0
    if gamma is not None:
        rgb = rgb ** (1.0 / gamma)
    illuminant = np.power(np.power(rgb, power).mean(axis=(0, 1)), 1.0 / power)
    illuminant = illuminant / np.sqrt((illuminant**2).sum())
    return np.clip(rgb / (illuminant * np.sqrt(3.0)), 0.0, 1.0)


def normalised(image: np.ndarray, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    return torch.from_numpy((image.astype(np.float32) / 255.0 - mean) / std).permute(2, 0, 1)[None]


@pytest.mark.parametrize("gamma", [None, 2.2])
def test_the_layer_matches_the_published_recipe(gamma: float | None) -> None:
    image = lesion_like(seed=4, size=(40, 30))
    layer = ShadesOfGray(mean=(0.5,) * 3, std=(0.5,) * 3, power=6, gamma=gamma)
    got = (layer(normalised(image))[0].permute(1, 2, 0).numpy() * 0.5) + 0.5
    np.testing.assert_allclose(got, shades_of_gray_reference(image, 6, gamma), atol=1e-5)


def chromaticity(images: torch.Tensor) -> torch.Tensor:
    rgb = images * 0.5 + 0.5
    return rgb / rgb.sum(dim=1, keepdim=True).clamp_min(1e-6)


def test_a_colour_cast_of_the_light_source_is_removed() -> None:
    """The same lesion under a warm and a cold light (per-channel gains) has the same colours after the layer (Shades
    of Gray divides out the light's colour, not its overall brightness: chromaticity is what must agree)."""
    image = lesion_like(seed=7, size=(48, 36)).astype(np.float64) * 0.5  # dim enough that no gain clips
    warm = np.clip(image * [1.3, 1.0, 0.7], 0, 255).astype(np.uint8)
    cold = np.clip(image * [0.75, 0.95, 1.35], 0, 255).astype(np.uint8)
    layer = ShadesOfGray(mean=(0.5,) * 3, std=(0.5,) * 3)
    before = (chromaticity(normalised(warm)) - chromaticity(normalised(cold))).abs().mean().item()
    after = (chromaticity(layer(normalised(warm))) - chromaticity(layer(normalised(cold)))).abs().mean().item()
    assert before > 0.05 and after < before / 10, (before, after)


def test_the_data_config_records_it_and_an_old_config_gets_no_layer() -> None:
    config = resolve_data_config("lesionnet_baseline", image_size=32, colour_constancy=SOG)
    assert config["colour_constancy"] == {"method": "shades_of_gray", "power": 6.0, "gamma": None}
    assert isinstance(build_colour_constancy(config), ShadesOfGray)
    old = resolve_data_config("lesionnet_baseline", image_size=32)
    assert "colour_constancy" not in old and isinstance(build_colour_constancy(old), torch.nn.Identity)
    # the layer has no weights: a model's state dict is the same with or without it
    with_layer = LesionClassifier(data_config=config).state_dict()
    assert set(with_layer) == set(LesionClassifier(data_config=old).state_dict())


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"method": "grey_edge"}, "must be one of"),
        ({"method": "shades_of_gray", "power": 0.5}, "power must be in"),
        ({"method": "shades_of_gray", "gamma": 0}, "gamma must be null or in"),
        ({"method": "shades_of_gray", "p": 6}, "unknown keys"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(setting: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_data_config("lesionnet_baseline", colour_constancy=setting)


def test_a_trained_checkpoint_applies_it_in_the_inference_core(trained_run_cc: Path) -> None:
    member = load_member(resolve_checkpoints(str(trained_run_cc))[0])
    assert member.data_config["colour_constancy"]["method"] == "shades_of_gray"
    images = sample_batch(member, n=3)
    with torch.no_grad():
        expected = member.model.model(member.model.colour_constancy(images))
        assert torch.allclose(forward(member, images).logits, expected, atol=1e-6)
        assert torch.allclose(member.model(images), expected, atol=1e-6)
        assert not torch.allclose(member.model.model(images), expected, atol=1e-3)  # the layer changes the answer
    # the predictor's preprocessing is the crop and normalisation only: the layer runs once, inside the network
    transform = build_eval_transform(member.data_config)
    assert "ShadesOfGray" not in repr(transform)
    assert Predictor([member]).predict_arrays([lesion_like(seed=1)]).probs.shape == (1, 7)


def test_the_exported_onnx_graph_contains_it_and_agrees_with_python(trained_run_cc: Path, tmp_path: Path) -> None:
    member = load_member(resolve_checkpoints(str(trained_run_cc))[0])
    sidecar = export(member, "onnx", tmp_path / "cc.onnx")
    assert sidecar["colour_constancy"]["power"] == 6.0
    images = sample_batch(member, n=5)
    got = ort.InferenceSession(str(tmp_path / "cc.onnx")).run(["logits"], {"image": images.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, member.model(images).numpy(), atol=1e-4)
    torchscript = export(member, "torchscript", tmp_path / "cc.pt")
    assert torchscript["parity"]["max_abs_prob_diff"] < 1e-4
