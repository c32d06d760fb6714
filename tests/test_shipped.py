"""The model that ships in the repository: served with no ckpt, and ``lesionnet predict`` in the terminal."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lesionnet.app.shipped import SHIPPED_MODEL, with_shipped_model
from lesionnet.data.metadata import embedded_sample_root
from lesionnet.inference import read_rgb
from lesionnet.inference.checkpoints import half_precision_checkpoint, load_member, resolve_checkpoints
from tests.conftest import REPO_ROOT
from tests.test_app import compose_serve, lesion_like
from tests.test_cli import LESIONNET

PREDICTIONS = SHIPPED_MODEL / "test_sample_predictions.csv"  # evaluate.py's rows for embedded-sample test images
CLASS_COLUMNS = {"akiec": "AKIEC", "bcc": "BCC", "bkl": "BKL", "df": "DF", "mel": "MEL", "nv": "NV", "vasc": "VASC"}


def test_the_shipped_folder_holds_a_model_its_scores_and_gates_under_25_mb() -> None:
    files = {p.relative_to(SHIPPED_MODEL).as_posix() for p in SHIPPED_MODEL.rglob("*") if p.is_file()}
    needed = {"checkpoints/model.ckpt", "scores.json", "split.csv", "metrics.json", "MODEL_CARD.md"}
    needed |= {f"gates/{name}_gate.json" for name in ("confidence", "ood", "image_type")}
    assert needed <= files, needed - files
    assert sum((SHIPPED_MODEL / f).stat().st_size for f in files) <= 25 * 2**20
    card = (SHIPPED_MODEL / "MODEL_CARD.md").read_text()
    assert "CC BY-NC 4.0" in card and "non-commercial" in card and "95% CI" in card


def test_with_no_ckpt_the_app_serves_the_shipped_model_and_answers_as_evaluate_scored(tmp_path: Path) -> None:
    """A clean clone has no data: the shipped scores.json and gate files are used as they are, and a test-split image
    of the embedded sample gets the probabilities evaluate.py wrote for it."""
    from lesionnet.app.build import build_service

    service = build_service(compose_serve([f"paths.output_dir={tmp_path}", "gradcam=false", "ood.enabled=true"]))
    assert service.predictor.members[0].path == SHIPPED_MODEL / "checkpoints" / "model.ckpt"
    assert service.scores is not None and service.image_type is not None and service.ood is not None
    assert service.gate.source != "default (not validated)"
    expected = pd.read_csv(PREDICTIONS)
    assert len(expected) >= 1
    for row in expected.itertuples(index=False):
        image = read_rgb(embedded_sample_root() / "images" / f"{row.image}.jpg")
        probs = service.predictor.predict_arrays([image]).probs[0]
        written = np.array([getattr(row, CLASS_COLUMNS[c]) for c in service.predictor.class_names])
        np.testing.assert_allclose(probs, written, atol=1e-6)
        answer = service.analyse(image)
        assert answer["urgency"]["melanoma_probability"] == pytest.approx(
            written[service.predictor.class_names.index("mel")], abs=1e-6
        )
        if answer["status"] == "ok":
            assert answer["top_class"]["code"] == service.predictor.class_names[int(np.argmax(written))]


def test_an_explicit_ckpt_takes_none_of_the_shipped_files(run: Path) -> None:
    cfg = with_shipped_model(compose_serve([f"ckpt={run}"]))
    assert cfg.ckpt == str(run) and cfg.scores is None and cfg.image_type.gate_file is None


def test_without_a_shipped_model_the_error_says_to_pass_a_ckpt(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Pass ckpt="):
        with_shipped_model(compose_serve([]), folder=tmp_path)


def test_a_half_precision_copy_keeps_its_provenance_and_predicts_within_a_thousandth(run: Path, tmp_path: Path) -> None:
    source = resolve_checkpoints(str(run))[0]
    copy = half_precision_checkpoint(source, tmp_path / "checkpoints" / "model.ckpt")
    original, half = load_member(source), load_member(copy)
    assert half.provenance == original.provenance and copy.stat().st_size < source.stat().st_size
    from lesionnet.inference import Predictor

    images = [lesion_like(seed=s) for s in range(3)]
    np.testing.assert_allclose(
        Predictor([half]).predict_arrays(images).probs, Predictor([original]).predict_arrays(images).probs, atol=1e-3
    )


@pytest.fixture(scope="module")
def run(trained_run: Path) -> Path:
    return trained_run


def predict(*arguments: str) -> subprocess.CompletedProcess[str]:
    """``lesionnet predict`` as a user runs it (the installed console script, offline)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [str(LESIONNET), "predict", *arguments]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600)


def test_lesionnet_predict_prints_status_class_referral_and_why_for_each_photo(run: Path, tmp_path: Path) -> None:
    photo = tmp_path / "spot.png"
    from PIL import Image

    Image.fromarray(lesion_like(seed=3)).save(photo)
    out, gates = f"paths.output_dir={tmp_path / 'out'}", f"unsure.cache_dir={tmp_path / 'gates'}"
    result = predict(str(photo), f"ckpt={run}", "gradcam=false", "ood.enabled=false", out, gates)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{photo}: " in result.stdout and "urgency: " in result.stdout
    missing = predict(str(tmp_path / "none.jpg"), f"ckpt={run}", "ood.enabled=false", out, gates)
    assert missing.returncode == 1 and "none.jpg: not analysed" in missing.stderr
