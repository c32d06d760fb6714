"""The feature-space OOD gate (lesionnet.inference.decision.ood), the photo builder and the OOD benchmark.

Synthetic features stand in for a model: a Gaussian cloud of "lesions" and points off it, so each property (ranking,
threshold, file round trip, version check) is checked exactly and in milliseconds. The builder and the benchmark
run once on what is installed and on the session's 1-epoch run.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest

from lesionnet.app import content
from lesionnet.contract.files import ContractError
from lesionnet.data.run_folder import RunFolder
from lesionnet.inference import Predictor, load_members
from lesionnet.inference.decision.ood import (
    OOD_METHODS,
    OodGate,
    fit_detector,
    fit_ood,
    fit_ood_features,
    ledoit_wolf,
    ood_auroc,
    out_of_sample_scores,
    wilson_interval,
)
from tests.conftest import REPO_ROOT

DIM = 24


def load_script(path: Path) -> ModuleType:
    """A script as a module (registered first: its dataclasses look their module up in sys.modules)."""
    name = f"_script_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def lesion_like(n: int, rng: np.random.Generator, shift: float = 0.0) -> np.ndarray:
    """Non-negative features around one direction (as pooled ReLU features are), ``shift`` moves them off it."""
    centre = np.ones(DIM)
    centre[: DIM // 2] += shift * 4
    return np.abs(centre + 0.3 * rng.normal(size=(n, DIM)))


@pytest.fixture(scope="module")
def features() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "val": lesion_like(120, rng),
        "test": lesion_like(200, rng),
        "far": lesion_like(50, rng, shift=1.0),
        "labels": np.array(["nv", "mel", "bkl"] * 40),
        "groups": np.repeat(np.arange(60), 2).astype(str),  # two images per lesion
    }


def fit(features: dict[str, np.ndarray], method: str, **kwargs: object) -> OodGate:
    return fit_ood_features(
        features["val"],
        method,
        model_version="model@abc",
        labels=features["labels"],
        groups=features["groups"],
        **kwargs,
    )


@pytest.mark.parametrize("method", OOD_METHODS)
def test_far_points_score_above_near_ones(features: dict[str, np.ndarray], method: str) -> None:
    gate = fit(features, method)
    near, far = gate.score(features["test"]), gate.score(features["far"])
    assert ood_auroc(near, far) > 0.99
    assert gate.refuses(features["far"]).mean() > 0.95
    assert gate.refuses(features["test"]).mean() < 0.15  # about 1 - quantile: a new sample of the same cloud


@pytest.mark.parametrize("method", OOD_METHODS)
def test_threshold_is_the_quantile_of_out_of_sample_validation_scores(
    features: dict[str, np.ndarray], method: str
) -> None:
    gate = fit(features, method, quantile=0.9)
    expected = out_of_sample_scores(features["val"], method, features["labels"], features["groups"])
    np.testing.assert_allclose(gate.validation_scores, expected)
    assert gate.threshold == pytest.approx(np.quantile(expected, 0.9))
    assert np.mean(gate.validation_scores > gate.threshold) == pytest.approx(0.1, abs=0.01)


def test_out_of_sample_scores_never_use_the_same_lesion() -> None:
    """Two identical images of one lesion: in-sample their kNN distance is 0; leaving the lesion out, it is not."""
    rng = np.random.default_rng(1)
    base = lesion_like(20, rng)
    features = np.repeat(base, 2, axis=0)
    groups = np.repeat(np.arange(20), 2)
    assert np.allclose(out_of_sample_scores(features, "knn"), 0.0)  # each image's nearest other image: its twin
    assert (out_of_sample_scores(features, "knn", groups=groups) > 1e-6).all()


def test_ledoit_wolf_matches_scikit_learn() -> None:
    covariance = pytest.importorskip("sklearn.covariance")
    rng = np.random.default_rng(2)
    for n, d in [(30, 50), (200, 10)]:
        x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
        x -= x.mean(axis=0)
        reference = covariance.LedoitWolf(assume_centered=True).fit(x)
        cov, shrinkage = ledoit_wolf(x)
        assert shrinkage == pytest.approx(reference.shrinkage_)
        np.testing.assert_allclose(cov, reference.covariance_, atol=1e-10)


def test_mahalanobis_is_the_matmul_form_of_the_distance(features: dict[str, np.ndarray]) -> None:
    """score = (z - m) P (z - m)' on L2-normalised z: what an exported graph computes from the stored arrays."""
    detector = fit_detector(features["val"], "mahalanobis")
    z = features["test"][:5] / np.linalg.norm(features["test"][:5], axis=1, keepdims=True)
    diff = z - detector.means[0].astype(np.float64)
    direct = np.einsum("nd,de,ne->n", diff, detector.precision.astype(np.float64), diff)
    np.testing.assert_allclose(detector.score(features["test"][:5]), direct, rtol=1e-6)


@pytest.mark.parametrize("method", OOD_METHODS)
def test_save_load_round_trip(features: dict[str, np.ndarray], method: str, tmp_path: Path) -> None:
    gate = fit(features, method)
    path = gate.save(tmp_path / "ood_gate.json")
    stored = json.loads(path.read_text())
    assert stored["method"] == method and stored["model_version"] == "model@abc"
    assert stored["n_images"] == 120 and stored["n_groups"] == 60 and stored["quantile"] == 0.95
    loaded = OodGate.load(path, "model@abc", tta="none")
    assert loaded.threshold == gate.threshold
    np.testing.assert_array_equal(loaded.score(features["far"]), gate.score(features["far"]))
    np.testing.assert_array_equal(loaded.refuses(features["test"]), gate.refuses(features["test"]))


def test_a_gate_of_another_model_or_tta_is_refused(features: dict[str, np.ndarray], tmp_path: Path) -> None:
    path = fit(features, "mahalanobis").save(tmp_path / "ood_gate.json")
    with pytest.raises(ContractError, match="fitted for model model@abc, not other@def.*Refit"):
        OodGate.load(path, "other@def")
    with pytest.raises(ContractError, match="tta=none.*tta=d4"):
        OodGate.load(path, "model@abc", tta="d4")


def test_a_gate_file_of_another_version_is_refused_with_the_fix(
    features: dict[str, np.ndarray], tmp_path: Path
) -> None:
    path = fit(features, "mahalanobis").save(tmp_path / "ood_gate.json")
    stored = json.loads(path.read_text())
    assert stored["schema_version"] == 1
    where = re.escape(str(path))
    path.write_text(json.dumps({**stored, "schema_version": 2}))
    with pytest.raises(
        ContractError, match=rf"{where} is a feature-space \(OOD\) gate file of schema version 2 .*Refit the gate"
    ):
        OodGate.load(path, "model@abc")
    path.write_text(json.dumps({k: v for k, v in stored.items() if k != "schema_version"}))
    with pytest.raises(ContractError, match=r"written before files were versioned.*serve without ood.gate_file"):
        OodGate.load(path, "model@abc")
    path.write_text(json.dumps({**stored, "threshold": "high"}))
    with pytest.raises(
        ContractError, match=rf"(?s){where} is not a valid feature-space \(OOD\) gate file.*threshold.*Refit the gate"
    ):
        OodGate.load(path, "model@abc")


def test_features_of_another_dimension_are_refused(features: dict[str, np.ndarray]) -> None:
    gate = fit(features, "mahalanobis")
    with pytest.raises(ValueError, match="dimension 8.*dimension 24"):
        gate.score(np.ones((2, 8)))


def test_wilson_interval_known_values() -> None:
    """Wilson (1927) 95% intervals, z = 1.959964: 0/10 -> [0, 0.2775], 10/10 -> [0.7225, 1], 5/10 -> [0.2366,
    0.7634], 81/263 -> [0.2553, 0.3662] (Newcombe 1998)."""
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.27753, abs=1e-5))
    assert wilson_interval(10, 10) == (pytest.approx(0.72247, abs=1e-5), 1.0)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(3, 2)


def test_auroc_counts_ties_half() -> None:
    assert ood_auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert ood_auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5


def test_fit_ood_on_a_trained_run_is_bound_to_its_model(trained_run: Path, tmp_path: Path) -> None:
    run = RunFolder(trained_run)
    val = run.split_table("val")
    predictor = Predictor(load_members([str(run.best_checkpoint())], device="cpu"))
    gate = fit_ood(predictor, val["path"].tolist(), "mahalanobis_class", groups=val["lesion_id"].tolist(), folds=3)
    assert gate.model_version == predictor.version and gate.n_images == len(val)
    assert set(gate.detector.labels) <= set(predictor.class_names)  # predicted classes stand in for labels
    features = predictor.predict_arrays([np.full((30, 40, 3), 128, dtype=np.uint8)]).features
    assert gate.refuses(features).dtype == bool and gate.refuses(features).shape == (1,)
    assert OodGate.load(gate.save(tmp_path / "gate.json"), predictor.version, predictor.tta).threshold == gate.threshold


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The photo folder built from whatever sample images are installed (matplotlib's are always there)."""
    builder = load_script(REPO_ROOT / "scripts" / "build_ood_photos.py")
    out = tmp_path_factory.mktemp("ood_photos")
    if builder.main(["--out", str(out), "--max-side", "256"]) != 0:
        pytest.skip("no sample photos installed")
    return out


def test_build_ood_photos_writes_rgb_images_and_two_halves(photos: Path) -> None:
    from PIL import Image

    manifest = pd.read_csv(photos / "manifest.csv")
    assert list(manifest.columns[:7]) == ["name", "source", "file", "scene", "category", "variant", "half"]
    assert manifest["name"].is_unique and set(manifest["half"]) <= {"choose", "report"}
    assert (manifest.groupby("scene")["half"].nunique() == 1).all()  # a photo and its crops stay in one half
    for name in manifest["name"]:
        with Image.open(photos / "images" / name) as image:
            assert image.mode == "RGB" and 200 <= min(image.size) <= 256
    if manifest["scene"].nunique() >= 2:
        assert set(manifest["half"]) == {"choose", "report"}


def test_ood_eval_cli_on_a_trained_run(trained_run: Path, photos: Path, tmp_path: Path) -> None:
    manifest = pd.read_csv(photos / "manifest.csv")
    if set(manifest["half"]) != {"choose", "report"}:
        pytest.skip("fewer than two photos installed: no choose and report halves (pip install -e '.[ood]')")
    bench = load_script(REPO_ROOT / "bench" / "ood_eval.py")
    out, gate_file = tmp_path / "ood.json", tmp_path / "gate.json"
    summary = bench.main(
        [
            "--run",
            str(trained_run),
            "--photos",
            str(photos),
            "--folds",
            "3",
            "--json",
            str(out),
            "--gate-out",
            str(gate_file),
        ]
    )
    assert json.loads(out.read_text())["chosen"] == summary["chosen"]
    names = [c["name"] for c in summary["candidates"]]
    assert summary["chosen"] in {"mahalanobis", "mahalanobis_class", "knn1", "knn5"} and "energy (baseline)" in names
    for candidate in summary["candidates"]:
        for part in (candidate["report"]["photos_refused"], candidate["test_refused"]):
            assert 0 <= part["k"] <= part["n"] and part["wilson95"][0] <= part["share"] <= part["wilson95"][1]
        assert 0.0 <= candidate["report"]["auroc_vs_test"] <= 1.0
    gate = OodGate.load(gate_file, summary["model_version"], tta="none")
    assert gate.method in {"mahalanobis", "mahalanobis_class", "knn"} and gate.n_images == summary["n_val"]


def test_the_app_sends_a_lesion_unlike_its_validation_lesions_to_a_doctor_instead_of_refusing_it(
    trained_run: Path, tmp_path: Path
) -> None:
    from lesionnet.app.build import build_service
    from lesionnet.data.run_folder import RunFolder
    from tests.test_app import compose_serve, lesion_like

    overrides = [
        f"ckpt={trained_run}",
        "device=cpu",
        "gradcam=false",
        "unsure.threshold=0",
        f"unsure.cache_dir={tmp_path / 'gates'}",
        f"paths.output_dir={tmp_path / 'out'}",
        "ood.enabled=true",
    ]
    service = build_service(compose_serve(overrides))
    assert service.ood is not None and len(list((tmp_path / "gates").glob("*.json"))) == 1  # fitted and cached
    validation = RunFolder(trained_run).split_table("val")["path"].tolist()
    features = service.predictor.predict_paths(validation).features  # (noise pictures: the image check refuses them)
    assert service.ood.refuses(features).mean() <= 0.2  # the images it was fitted on (out-of-sample threshold, 95%)
    stranger = service.analyse(lesion_like(seed=5))  # a smooth picture among noise-image "lesions"
    assert stranger["status"] == "unsure" and not stranger["familiarity"]["familiar"]  # question 2: flagged
    assert stranger["top_class"] is None and len(stranger["probabilities"]) == len(service.predictor.class_names)
    assert stranger["urgency"]["level"] == "see_dermatologist" and stranger["urgency"]["refer"] is True
    assert stranger["message"] == content.MESSAGES["unfamiliar"]
    assert any("unlike the ones the model learnt" in r for r in stranger["urgency"]["reasons"])
    again = build_service(compose_serve(overrides))  # second start: the cached gate, same threshold
    assert again.ood.threshold == service.ood.threshold
