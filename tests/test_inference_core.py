"""One inference core: nothing else loads checkpoints or runs the prediction pass, and evaluate.py and the app
predict the same probabilities for the same files (EXIF-rotated ones included)."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lesionnet.app.build import build_service
from lesionnet.app.ondevice import OnDevice
from lesionnet.app.upload import UploadLimits, decode_image
from lesionnet.contract.files import ContractError
from lesionnet.contract.scores import POSTHOC_LA, read_scores, verify_scores
from lesionnet.data.decode import read_rgb
from lesionnet.data.run_folder import RunFolder
from lesionnet.evaluation.runner import evaluate
from lesionnet.inference import Predictor, forward, load_member, resolve_checkpoints
from lesionnet.inference.decision.policy import ConfidenceGate
from tests.conftest import REPO_ROOT
from tests.test_app import compose_serve, lesion_like
from tests.test_evaluate import compose_eval

CORE = REPO_ROOT / "lesionnet" / "inference"
# Calls that load a checkpoint or run the prediction forward pass; allowed in the core only. Pretrained ImageNet
# weights (not checkpoints) are read by the models package, which also defines forward_features/forward_head.
CORE_ONLY_CALLS = {"torch.load", "forward_features", "forward_head", "tta_views", "LesionClassifier"}
ALLOWED = {
    "torch.load": {REPO_ROOT / "lesionnet" / "models" / "lite_weights.py"},
    "forward_features": {REPO_ROOT / "lesionnet" / "models" / "baseline.py"},
    "forward_head": {REPO_ROOT / "lesionnet" / "models" / "baseline.py"},
    "LesionClassifier": set(),
}


def called_names(path: Path) -> set[str]:
    """Functions and methods called in a Python file: ``torch.load(...)`` -> ``torch.load``, ``x.f(...)`` -> ``f``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute):
                owner = func.value.id if isinstance(func.value, ast.Name) else ""
                names.add("torch.load" if (owner, func.attr) == ("torch", "load") else func.attr)
            else:
                names.add(getattr(func, "id", ""))
    return names


def test_only_the_core_loads_checkpoints_and_runs_the_prediction_pass() -> None:
    sources = [
        *sorted((REPO_ROOT / "lesionnet").rglob("*.py")),
        *sorted((REPO_ROOT / "bench").rglob("*.py")),
        REPO_ROOT / "train.py",
        REPO_ROOT / "evaluate.py",
    ]
    offenders = []
    for path in sources:
        if CORE in path.parents or path.name == "module.py":  # module.py defines LesionClassifier and trains it
            continue
        for name in called_names(path) & CORE_ONLY_CALLS:
            if path not in ALLOWED.get(name, set()):
                offenders.append(f"{path.relative_to(REPO_ROOT)}: {name}()")
    assert not offenders, f"outside lesionnet/inference: {offenders}"


def test_the_check_sees_a_torch_load(tmp_path: Path) -> None:
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("import torch\nstate = torch.load('x.ckpt', weights_only=True)\nmodel.forward_features(x)\n")
    assert {"torch.load", "forward_features"} <= called_names(sneaky)


def test_forward_equals_the_modules_own_forward(trained_run: Path) -> None:
    member = load_member(resolve_checkpoints(str(trained_run))[0])
    images = torch.randn(3, 3, *member.data_config["input_size"][1:])
    with torch.inference_mode():
        out = forward(member, images)
        assert torch.equal(out.logits, member.model(images))
    assert out.features.shape[0] == 3 and out.feature_map.ndim == 4


def exif_rotated_jpeg(upright: np.ndarray) -> bytes:
    """The same picture stored sideways with EXIF orientation 6 (as phones store portrait photos)."""
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # orientation 6 undoes this
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def test_evaluate_and_the_app_predict_the_same_probabilities(trained_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(lesion_like(seed=10 + k, size=(60, 45))).save(folder / f"new_{k}.png")
    (folder / "new_0_rotated.jpg").write_bytes(exif_rotated_jpeg(read_rgb(folder / "new_0.png")))
    assert Image.open(folder / "new_0_rotated.jpg").size == (45, 60)  # stored sideways

    evaluate(
        compose_eval(
            [
                f"ckpt={trained_run}",
                f"data.images={folder}",
                f"paths.output_dir={tmp_path / 'eval'}",
                "data.batch_size=1",
            ]
        )
    )
    (predictions,) = (tmp_path / "eval").glob("predictions_*.csv")
    evaluated = pd.read_csv(predictions).set_index("image")

    service = build_service(
        compose_serve(
            [
                f"ckpt={trained_run}",
                "device=cpu",
                "gradcam=false",
                "unsure.threshold=0",
                f"paths.output_dir={tmp_path / 'serve'}",
            ]
        )
    )
    order = [c.upper() for c in service.predictor.class_names]
    for path in sorted(folder.iterdir()):
        image = decode_image(path.read_bytes(), UploadLimits(min_side=16))
        served = service.predictor.predict_arrays([image]).probs[0]
        np.testing.assert_allclose(served, evaluated.loc[path.stem, order].to_numpy(float), rtol=0, atol=1e-6)
    upright = evaluated.loc["new_0", order].to_numpy(float)
    np.testing.assert_allclose(evaluated.loc["new_0_rotated", order].to_numpy(float), upright, atol=0.02)


def test_weights_change_the_ensemble_not_the_members(trained_run: Path) -> None:
    member = load_member(resolve_checkpoints(str(trained_run))[0])
    images = [lesion_like(seed=s, size=(60, 45)) for s in range(2)]
    plain = Predictor([member, member]).predict_arrays(images)
    weighted = Predictor([member, member], weights=[3, 1]).predict_arrays(images)
    np.testing.assert_allclose(weighted.member_probs, plain.member_probs)
    np.testing.assert_allclose(weighted.probs, plain.probs)  # same member twice: any weights give the same mean
    with pytest.raises(ValueError, match="one non-negative weight per model"):
        Predictor([member], weights=[1, 1])
    assert RunFolder(trained_run).metrics().schema_version == 1


def test_tta_is_part_of_the_model_version(trained_run: Path, tmp_path: Path) -> None:
    """The averaged views give other probabilities: a gate fitted without TTA must not be taken for one with it."""
    member = load_member(resolve_checkpoints(str(trained_run))[0])
    versions = {tta: Predictor([member], tta=tta).version for tta in ("none", "flips", "d4")}
    assert len(set(versions.values())) == 3 and versions["flips"] == Predictor([member], tta="flips").version
    gate = ConfidenceGate("msp", 0.3, "fitted without TTA", versions["none"]).save(tmp_path / "gate.json")
    assert ConfidenceGate.load(gate, versions["none"]).threshold == 0.3
    with pytest.raises(ContractError, match="was fitted for model"):
        ConfidenceGate.load(gate, versions["flips"])


def test_the_app_serves_the_post_hoc_adjusted_row_evaluate_fitted(trained_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(lesion_like(seed=20 + k, size=(60, 45))).save(folder / f"new_{k}.png")
    labels = tmp_path / "labels.csv"
    labels.write_text("image_id,dx\nnew_0,mel\nnew_1,nv\nnew_2,bcc\n")
    out = tmp_path / "eval"
    evaluate(
        compose_eval(
            [
                f"ckpt={trained_run}",
                f"data.images={folder}",
                f"data.labels={labels}",
                "posthoc_logit_adjustment=true",
                f"paths.output_dir={out}",
                "bootstrap=10",
            ]
        )
    )
    document = read_scores(out / "scores.json")
    assert document.scores is not None
    (row,) = [name for name in document.scores if name.endswith(POSTHOC_LA)]
    fitted = document.scores[row].logit_adjustment
    assert fitted is not None
    evaluated = pd.read_csv(out / f"predictions_{row}.csv").set_index("image")

    serve = [f"ckpt={trained_run}", "device=cpu", "gradcam=false", "unsure.threshold=0"]
    service = build_service(
        compose_serve([*serve, f"scores={out / 'scores.json'}", "logit_adjustment=true", f"paths.output_dir={out}"])
    )
    served_adjustment = service.predictor.logit_adjustment
    assert served_adjustment is not None
    assert (served_adjustment.tau, served_adjustment.prior) == (fitted.tau, fitted.prior)
    assert "post-hoc logit adjustment" in OnDevice(service, tmp_path / "on_device").unavailable  # the graph has none
    at_threshold = document.scores[row].at_val_threshold
    assert at_threshold is not None and service.referral.melanoma_threshold == at_threshold.threshold
    order = [c.upper() for c in service.predictor.class_names]
    paths = sorted(folder.iterdir())
    served = service.predictor.predict_paths(paths).probs
    np.testing.assert_allclose(served, evaluated.loc[[p.stem for p in paths], order].to_numpy(float), atol=1e-6)

    # the adjustment itself (whatever tau validation chose above): tau = 1 divides by the prior, then renormalises
    member = service.predictor.members[0]
    plain = Predictor([member]).predict_paths(paths)
    adjusted = Predictor([member], logit_adjustment={"tau": 1.0, "prior": fitted.prior}).predict_paths(paths)
    expected = plain.probs / np.asarray(fitted.prior)
    np.testing.assert_allclose(adjusted.probs, expected / expected.sum(1, keepdims=True), atol=1e-9)
    np.testing.assert_allclose(adjusted.member_probs, plain.member_probs)  # members stay as they are
    assert (
        Predictor([member], logit_adjustment={"tau": 1.0, "prior": fitted.prior}).version != Predictor([member]).version
    )
    assert verify_scores(document, out / "scores.json") is None  # evaluate.py's own file matches its digests

    unadjusted = tmp_path / "plain"
    evaluate(compose_eval([f"ckpt={trained_run}", f"data.images={folder}", f"data.labels={labels}",
                           f"paths.output_dir={unadjusted}", "bootstrap=10"]))  # fmt: skip
    with pytest.raises(ContractError, match="posthoc_logit_adjustment=true"):
        build_service(compose_serve([*serve, f"scores={unadjusted / 'scores.json'}", "logit_adjustment=true"]))
    with pytest.raises(ContractError, match=r"pass its scores.json \(scores=...\)"):
        build_service(compose_serve([*serve, "logit_adjustment=true"]))
