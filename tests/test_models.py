"""The seed's baseline CNN, registered with timm, with the exact Keras parameter count."""

from __future__ import annotations

import pytest
import timm
import torch

import lesionnet  # noqa: F401  (registers the models)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_baseline_is_a_registered_timm_model() -> None:
    assert "lesionnet_baseline" in timm.list_models("lesionnet_*")
    assert "lesionnet_baseline_bn" in timm.list_models("lesionnet_*")


def test_baseline_has_the_keras_parameter_count_at_64px() -> None:
    model = timm.create_model("lesionnet_baseline", num_classes=7)
    assert _params(model) == 2_124_839
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize("size", [(96, 128), (150, 200), (48, 48)])
def test_baseline_takes_other_sizes_with_the_same_parameters(size: tuple[int, int]) -> None:
    model = timm.create_model("lesionnet_baseline", num_classes=7)
    assert model(torch.randn(1, 3, *size)).shape == (1, 7)
    assert _params(model) == 2_124_839


def test_baseline_follows_timm_classifier_interface() -> None:
    model = timm.create_model("lesionnet_baseline", num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    assert features.shape == (2, 64, 8, 8)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(features), model(x))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert timm.data.resolve_model_data_config(model)["input_size"] == (3, 64, 64)


def test_bn_variant_adds_batchnorm_after_each_conv() -> None:
    model = timm.create_model("lesionnet_baseline_bn", num_classes=7)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 3
