"""Export: ONNX and TorchScript files carry their preprocessing and agree with PyTorch on real images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lesionnet.contract.files import ContractError
from lesionnet.contract.on_device import read_export_sidecar
from lesionnet.export import ExportError, export, parity, sample_batch
from lesionnet.inference import load_member, resolve_checkpoints
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def ckpt(trained_run: Path) -> Path:
    return resolve_checkpoints(str(trained_run))[0]


def test_onnx_carries_preprocessing_and_matches_pytorch(ckpt: Path, tmp_path: Path) -> None:
    member = load_member(ckpt)
    sidecar = export(member, "onnx", tmp_path / "model.onnx")
    model = onnx.load(str(tmp_path / "model.onnx"))
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["input_size"] == [3, 24, 32] and meta["class_names"] == member.class_names
    assert meta["mean"] == pytest.approx(list(member.data_config["mean"])) and meta["interpolation"] == "bilinear"
    assert json.loads((tmp_path / "model.json").read_text()) == sidecar
    assert read_export_sidecar(tmp_path / "model.json").model_dump(mode="json") == sidecar  # its schema, version 1
    assert sidecar["parity"]["max_abs_prob_diff"] < 1e-4
    # batch size is dynamic and the outputs match PyTorch within 1e-4 on real (embedded sample) images
    images = sample_batch(member, n=6)
    got = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"image": images.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, member.model(images).numpy(), atol=1e-4)


def test_torchscript_export_and_a_failing_parity_check(ckpt: Path, tmp_path: Path) -> None:
    member = load_member(ckpt)
    sidecar = export(member, "torchscript", tmp_path / "model.pt")
    extra = {"lesionnet.json": ""}
    torch.jit.load(str(tmp_path / "model.pt"), _extra_files=extra)
    assert json.loads(extra["lesionnet.json"])["class_names"] == sidecar["class_names"]
    with torch.no_grad():  # a model that drifted from the file must be caught
        member.model.model.classifier.bias.add_(0.1)
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        parity(member, tmp_path / "model.pt", sample_batch(member))


def test_a_sidecar_of_another_version_is_refused_with_the_fix(ckpt: Path, tmp_path: Path) -> None:
    sidecar = export(load_member(ckpt), "torchscript", tmp_path / "model.pt")
    (tmp_path / "model.json").write_text(json.dumps({**sidecar, "schema_version": 2}))
    with pytest.raises(ContractError, match=r"model.json is a model export sidecar of schema version 2 .*Export the"):
        read_export_sidecar(tmp_path / "model.json")
    (tmp_path / "model.json").write_text(json.dumps({**sidecar, "mean": "imagenet"}))
    with pytest.raises(ContractError, match=r"(?s)model.json is not a valid model export sidecar.*mean"):
        read_export_sidecar(tmp_path / "model.json")


def test_cli(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.onnx"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lesionnet.cli.export",
            f"ckpt={ckpt}",
            f"out={out}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        check=True,
        cwd=REPO_ROOT,
        capture_output=True,
    )
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["parity"]["n_images"] == 4


@pytest.mark.slow
def test_onnx_outputs_the_apps_cam_grid_ood_and_image_type_scores_for_a_gap_linear_head(tmp_path: Path) -> None:
    """The on-device graph: probabilities, energy, the top class's CAM grid, the familiarity (OOD) score and the
    image-type score, each checked
    against the app's own computation at export (parity raises otherwise) and again here on other images."""
    from lesionnet.export import reference_outputs, run_exported
    from lesionnet.inference.decision.image_type import fit_image_type
    from lesionnet.inference.decision.ood import fit_ood_features
    from tests.test_cam import member_of

    member = member_of("tf_efficientnet_lite0", 64)
    features = np.random.default_rng(0).normal(size=(40, 1280)) + 2.0
    gate = fit_ood_features(
        features, "mahalanobis_class", model_version="m", labels=[k % 3 for k in range(40)], groups=list(range(40))
    )
    stage_stats = np.random.default_rng(1).normal(size=(40, 1024))  # Lite0's five stages: 2 x (16+24+40+112+320)
    image_type = fit_image_type(
        stage_stats, [k % 2 for k in range(40)], [str(k) for k in range(40)], model_version="m", tta="none"
    )
    sidecar = export(member, "onnx", tmp_path / "m.onnx", ood=gate, image_type=image_type)
    assert sidecar["outputs"] == ["logits", "probs", "neg_energy", "cam_grid", "ood_score", "image_type_score"]
    images = sample_batch(member, n=6)
    got = run_exported(tmp_path / "m.onnx", images)
    expected = reference_outputs(member, images, gate, image_type)
    np.testing.assert_allclose(got["probs"], expected["probs"], atol=1e-4)
    np.testing.assert_allclose(got["cam_grid"], expected["cam_grid"], atol=2e-3)
    np.testing.assert_allclose(got["ood_score"], expected["ood_score"], rtol=1e-4)
    np.testing.assert_allclose(got["image_type_score"], expected["image_type_score"], atol=1e-3)
    assert np.ptp(expected["image_type_score"]) > 0  # the gate's score depends on the image
    with pytest.raises(ExportError, match="kNN"):
        export(member, "onnx", tmp_path / "k.onnx", ood=fit_ood_features(features, "knn", model_version="m", k=2))
