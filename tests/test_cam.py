"""Class activation maps from the forward pass equal Grad-CAM (pytorch-grad-cam) for global-average-pool + linear
heads, up to ReLU and scaling; heads where they differ (the baseline CNN) are detected and keep Grad-CAM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from lesionnet.data.transforms import resolve_data_config
from lesionnet.inference import Member, Predictor
from lesionnet.inference.explain import find_target_layer
from lesionnet.module import LesionClassifier
from tests.test_app import lesion_like


def member_of(backbone: str, size: int) -> Member:
    """A randomly initialised model, the same whatever ran before in this process (the global seed is set first)."""
    torch.manual_seed(0)
    model = LesionClassifier(
        backbone=backbone, pretrained=False, data_config=resolve_data_config(backbone, image_size=size)
    )
    for parameter in model.model.get_classifier().parameters():  # a trained-looking head, not timm's zero bias
        torch.nn.init.normal_(parameter, std=0.5)
    return Member(
        name=backbone, path=Path(f"{backbone}.ckpt"), model=model.eval(), sha256="0" * 64, provenance=None, run=None
    )


def gradcam_as_published(member: Member, batch: torch.Tensor, class_index: int) -> np.ndarray:
    network = member.model.model
    _, layer = find_target_layer(network, tuple(member.data_config["input_size"]))
    with GradCAM(model=network, target_layers=[layer]) as cam:
        return cam(input_tensor=batch.clone().requires_grad_(True), targets=[ClassifierOutputTarget(class_index)])[0]


def cam_scaled_like_gradcam(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's post-processing: ReLU, min-max scale and resize to the input, scale again."""
    per_layer = scale_cam_image(np.maximum(cams[None], 0), size)
    return scale_cam_image(np.maximum(per_layer, 0))[0]


@pytest.mark.parametrize("class_index", [0, 4])
def test_cam_from_the_forward_pass_equals_gradcam_for_a_gap_linear_head(class_index: int) -> None:
    member = member_of("tf_efficientnet_lite0", 96)
    predictor = Predictor([member])
    assert predictor.cam_available
    image = lesion_like(seed=3, size=(128, 96))
    prediction = predictor.predict_arrays([image], cams=True)
    cams = prediction.cams[0]
    assert cams.shape == (7, 3, 3)  # 96 px at stride 32
    bias = member.model.model.get_classifier().bias.detach().numpy()
    from_maps = cams.mean(axis=(1, 2)) + bias  # the map's mean plus the bias is the logit, so softmax(mean) = probs
    softmax = np.exp(from_maps - from_maps.max()) / np.exp(from_maps - from_maps.max()).sum()
    # float32 maps summed in another order than the model's pooling: logits spanning ~90 agree to ~1e-5 (CPU kernels
    # differ between machines), so probabilities within 2e-5; a wrong map (no bias, wrong class) is off by far more
    np.testing.assert_allclose(softmax, prediction.probs[0], atol=2e-5)  # (log(probs) is imprecise for tiny ones)

    batch = predictor.preprocess(0, [image])
    expected = gradcam_as_published(member, batch, class_index)
    np.testing.assert_allclose(cam_scaled_like_gradcam(cams[class_index], (96, 96)), expected, atol=1e-4)


def test_heads_that_are_not_gap_linear_keep_gradcam() -> None:
    predictor = Predictor([member_of("lesionnet_baseline", 64)])
    assert not predictor.cam_available
    with pytest.raises(ValueError, match="need Grad-CAM"):
        predictor.predict_arrays([lesion_like(size=(64, 64))], cams=True)


def test_the_app_sends_the_forward_pass_cam_for_a_gap_linear_head() -> None:
    from lesionnet.app.service import LesionService
    from lesionnet.inference.decision.policy import ConfidenceGate

    member = member_of("tf_efficientnet_lite0", 96)
    service = LesionService(Predictor([member]), gate=ConfidenceGate("msp", 0.0))
    assert service.use_cam and service.explainer is None  # no Grad-CAM hooks, no backward pass
    answer = service.analyse(lesion_like(seed=3, size=(128, 96)))
    heatmap = answer["heatmap"]
    assert heatmap["method"] == "cam" and np.asarray(heatmap["grid"]).shape == (3, 3)
    assert heatmap["class_code"] == answer["probabilities"][0]["code"] and max(map(max, heatmap["grid"])) == 1.0
