"""evaluate.py: single models, ensembles, external sets, TTA and every refusal, on checkpoints trained here."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from lesionnet.classes import CLASS_NAMES
from lesionnet.contract.files import ContractError
from lesionnet.contract.provenance import ProvenanceError, file_sha256
from lesionnet.contract.scores import (
    SCORES_VERSION,
    CalibrationFigures,
    DisplayCalibration,
    ScoresFile,
    read_scores,
    verify_scores,
    write_scores,
)
from lesionnet.data.isic import ISIC_COLUMNS
from lesionnet.data.metadata import DatasetError
from lesionnet.evaluation.eval_report import write_eval_report
from lesionnet.evaluation.external_sets import read_labels
from lesionnet.evaluation.runner import EvalSet, bootstrap_unit, ensemble_weights, evaluate
from lesionnet.inference import CheckpointError, load_member, resolve_checkpoints, tta_views
from lesionnet.inference.decision.combine import apply_scaling
from lesionnet.training import train
from tests.conftest import make_ham_dir, write_image
from tests.test_train import CONF, FAST, compose_train


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two short training runs on one synthetic dataset and one split, plus one run on another split."""
    base = tmp_path_factory.mktemp("eval")
    data = make_ham_dir(
        base / "ham", smooth=True, image_size=(80, 60)
    )  # pictures, so resized copies keep their perceptual hash
    out = {"data": data}
    for name, overrides in {
        "baseline": ["model=baseline"],
        "baseline_bn": ["model=baseline_bn", "data.image_size=[32,40]"],
        "other_split": ["model=baseline", "data.split_seed=7"],
    }.items():
        out[name] = base / name
        train(
            compose_train(
                [f"data.root={data}", f"paths.output_dir={out[name]}", "trainer.max_epochs=1", *FAST, *overrides]
            )
        )
    return out


def compose_eval(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("eval", overrides=[*overrides, "data.num_workers=0", "bootstrap=200"])


def test_single_run_writes_scores_predictions_plots_and_report(runs: dict[str, Path], tmp_path: Path) -> None:
    result = evaluate(compose_eval([f"ckpt={runs['baseline']}", f"paths.output_dir={tmp_path}"]))
    scores = json.loads((tmp_path / "scores.json").read_text())
    name = next(iter(scores["scores"]))
    s = scores["scores"][name]
    assert s["ci95"]["accuracy"][0] <= s["accuracy"] <= s["ci95"]["accuracy"][1]
    assert {"argmax", "val_threshold"} <= set(s["melanoma"]) and s["temperature"] > 0
    split = pd.read_csv(runs["baseline"] / "split.csv")
    preds = pd.read_csv(tmp_path / f"predictions_{name}.csv")
    assert list(preds.columns) == ["image", *ISIC_COLUMNS]
    assert sorted(preds["image"]) == sorted(split.loc[split.split == "test", "image_id"])
    np.testing.assert_allclose(preds[list(ISIC_COLUMNS)].sum(axis=1), 1.0, atol=1e-5)
    assert result.plots is not None
    for file in result.plots.values():
        assert (tmp_path / file).stat().st_size > 1000
    report = (tmp_path / "report.md").read_text()
    assert "balanced acc [95% CI]" in report and all(f"]({f})" in report for f in result.plots.values())
    assert report.startswith("# LesionNet evaluation: test\n") and not scores["in_sample"]
    n_lesions = split.loc[split.split == "test", "lesion_id"].nunique()
    assert scores["bootstrap"] == {
        "unit": "lesions",
        "n_units": n_lesions,
        "resamples": 200,
        "description": f"bootstrap over {n_lesions:,} lesions",
    }
    assert f"95% intervals: bootstrap over {n_lesions:,} lesions, 200 resamples." in report


def test_ensemble_is_the_average_of_member_probabilities(runs: dict[str, Path], tmp_path: Path) -> None:
    both = f"ckpt=[{runs['baseline']},{runs['baseline_bn']}]"
    result = evaluate(compose_eval([both, f"paths.output_dir={tmp_path}"]))
    assert result.ensemble is not None and result.scores is not None
    assert len(result.ensemble.members) == 2 and result.final == "ensemble"
    cols = list(ISIC_COLUMNS)
    members = [pd.read_csv(tmp_path / f"predictions_{n}.csv")[cols].to_numpy() for n in result.ensemble.members]
    ensemble = pd.read_csv(tmp_path / "predictions_ensemble.csv")[cols].to_numpy()
    np.testing.assert_allclose(ensemble, (members[0] + members[1]) / 2, atol=2e-6)  # CSV keeps 6 decimals
    assert set(result.scores) == {*result.ensemble.members, "ensemble"}  # singles reported too
    assert result.ensemble.weights == [0.5, 0.5]


def test_fitted_ensemble_weights_are_recorded_next_to_their_members(runs: dict[str, Path], tmp_path: Path) -> None:
    both = f"ckpt=[{runs['baseline']},{runs['baseline_bn']}]"
    result = evaluate(compose_eval([both, "ensemble=fit", f"paths.output_dir={tmp_path}"]))
    saved = json.loads((tmp_path / "scores.json").read_text())["ensemble"]
    assert result.ensemble is not None and saved == result.ensemble.model_dump() and saved["mode"] == "fit"
    assert len(saved["weights"]) == len(saved["members"]) >= 1
    assert sum(saved["weights"]) == pytest.approx(1.0) and min(saved["weights"]) > 0
    cols = list(ISIC_COLUMNS)
    members = [pd.read_csv(tmp_path / f"predictions_{n}.csv")[cols].to_numpy() for n in saved["members"]]
    ensemble = pd.read_csv(tmp_path / "predictions_ensemble.csv")[cols].to_numpy()
    weighted = sum(weight * probs for weight, probs in zip(saved["weights"], members, strict=True))
    np.testing.assert_allclose(ensemble, weighted, atol=2e-6)  # the ensemble scored is the recorded weighted mean
    report = (tmp_path / "report.md").read_text()
    assert (
        "Ensemble (fit) of: "
        + ", ".join(f"{n} ({w:.3f})" for n, w in zip(saved["members"], saved["weights"], strict=True))
        in report
    )


def test_every_row_carries_its_validation_score_to_choose_by(runs: dict[str, Path], tmp_path: Path) -> None:
    """Each model and the ensemble report their validation accuracy and balanced accuracy beside the test figures
    (what members, recipes and ensembles are compared by): the same figures as scoring the validation split itself."""
    both = f"ckpt=[{runs['baseline']},{runs['baseline_bn']}]"
    result = evaluate(compose_eval([both, f"paths.output_dir={tmp_path / 'test'}"]))
    in_sample = evaluate(
        compose_eval([both, "data.split=val", "in_sample=true", f"paths.output_dir={tmp_path / 'val'}"])
    )
    assert result.scores is not None and in_sample.scores is not None and result.ensemble is not None
    assert set(result.scores) == set(in_sample.scores) == {*result.ensemble.members, "ensemble"}
    for name, row in result.scores.items():
        assert row.validation is not None
        assert row.validation.accuracy == pytest.approx(in_sample.scores[name].accuracy, abs=1e-6)
        expected = in_sample.scores[name].balanced_accuracy
        assert row.validation.balanced_accuracy == pytest.approx(expected, abs=1e-6)
    assert re.search(r"\|\s*val balanced acc\s*\|", (tmp_path / "test" / "report.md").read_text())


def test_in_sample_validation_is_titled_optimistic(runs: dict[str, Path], tmp_path: Path) -> None:
    result = evaluate(
        compose_eval([f"ckpt={runs['baseline']}", "data.split=val", "in_sample=true", f"paths.output_dir={tmp_path}"])
    )
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["set"] == result.set == "validation (in-sample, optimistic)" and saved["in_sample"] is True
    assert saved["evaluated"].startswith("validation (in-sample, optimistic) split of ")
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# LesionNet evaluation: validation (in-sample, optimistic)\n")
    assert "**In-sample:**" in report and "test split" not in report and "test sensitivity" not in report


def test_validation_split_is_refused_without_the_in_sample_flag(tmp_path: Path) -> None:
    # Refused before any checkpoint is read: no model is needed to get the message.
    with pytest.raises(ValueError, match=r"data.split=val scores the very images .* set in_sample=true"):
        evaluate(compose_eval([f"ckpt={tmp_path / 'any.ckpt'}", "data.split=val", f"paths.output_dir={tmp_path}"]))
    with pytest.raises(ValueError, match="data.split=train cannot be scored"):
        evaluate(compose_eval([f"ckpt={tmp_path / 'any.ckpt'}", "data.split=train", f"paths.output_dir={tmp_path}"]))


def test_hand_typed_ensemble_weights_are_refused_with_the_fix(tmp_path: Path) -> None:
    # An old config (or +ensemble_weights=...) still carrying hand weights; eval.yaml no longer has the key, so a
    # plain ensemble_weights=... override is already refused by Hydra.
    cfg = compose_eval([f"ckpt={tmp_path / 'any.ckpt'}", "+ensemble_weights=[0.3,0.7]", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="weights are now fitted on validation .* ensemble=fit"):
        evaluate(cfg)


def _probs(true_class_probs: list[float], targets: np.ndarray) -> np.ndarray:
    """Two-class probabilities giving each image's true class the given probability."""
    probs = np.empty((len(targets), 2))
    probs[np.arange(len(targets)), targets] = true_class_probs
    probs[np.arange(len(targets)), 1 - targets] = 1 - np.asarray(true_class_probs)
    return probs


def test_ensemble_weights_per_mode_leave_out_members_fitted_to_zero() -> None:
    targets = np.array([0, 1, 0, 1])
    val_probs = {"good": _probs([0.9, 0.8, 0.7, 0.9], targets), "bad": _probs([0.1, 0.2, 0.1, 0.3], targets)}
    names = ["bad", "good"]

    def cfg(mode: str) -> DictConfig:
        return OmegaConf.create({"ensemble": mode, "greedy_metric": "log_loss"})

    assert ensemble_weights(cfg("mean"), val_probs, targets, names) == (names, [0.5, 0.5])
    assert ensemble_weights(cfg("greedy"), val_probs, targets, names) == (["good"], [1.0])
    members, weights = ensemble_weights(cfg("fit"), val_probs, targets, names)
    assert members == ["good"] and weights == pytest.approx([1.0])
    with pytest.raises(CheckpointError, match="ensemble=fit is chosen on a validation split that every member shares"):
        ensemble_weights(cfg("fit"), {}, None, names)


def test_bootstrap_unit_is_lesions_where_their_ids_are_known_else_images() -> None:
    with_ids = EvalSet(pd.DataFrame({"image_id": ["a", "b", "c"], "lesion_id": ["L1", "L1", "L2"]}), "x", "test")
    assert bootstrap_unit(with_ids, 100).model_dump() == {
        "unit": "lesions",
        "n_units": 2,
        "resamples": 100,
        "description": "bootstrap over 2 lesions",
    }
    external = EvalSet(pd.DataFrame({"image_id": [f"ISIC_{i}" for i in range(1520)]}), "y", "external")
    assert bootstrap_unit(external, 100).description == "bootstrap over images: lesion ids unknown (1,520 images)"
    assert external.lesion_ids is None and list(with_ids.lesion_ids) == ["L1", "L1", "L2"]


def _result(title: str, in_sample: bool, bootstrap: str) -> ScoresFile:
    """A scores.json as evaluate.py writes it, with made-up figures."""
    scores = {
        "n": 1520,
        "accuracy": 0.8,
        "balanced_accuracy": 0.7,
        "macro_f1": 0.6,
        "macro_auroc": 0.9,
        "log_loss": 0.5,
        "ece": 0.05,
        "ci95": {"accuracy": [0.75, 0.85], "balanced_accuracy": [0.6, 0.8]},
        "per_class": {"mel": {"precision": 0.5, "recall": 0.6, "f1": 0.55, "auroc": 0.9, "support": 10}},
        "confusion_matrix": [[6, 4], [10, 1500]],
        "melanoma": {
            "argmax": {"sensitivity": 0.6, "specificity": 0.99, "threshold": None},
            "auroc": 0.9,
            "val_threshold": {"target_sensitivity": 0.95, "threshold": 0.224, "sensitivity": 0.9, "specificity": 0.5},
        },
    }
    unit = "lesions" if "lesions" in bootstrap else "images"
    return ScoresFile.model_validate(
        {
            "evaluated": f"{title} split of run",
            "set": title,
            "in_sample": in_sample,
            "n_images": 1520,
            "tta": "none",
            "validation": "validation split of run",
            "ensemble": None,
            "models": [{"name": "m", "file": "m.ckpt", "sha256": "0" * 64, "provenance": "checked"}],
            "bootstrap": {"unit": unit, "n_units": 1120, "description": bootstrap, "resamples": 1000},
            "scores": {"m": scores},
            "final": "m",
            "plots": {},
        }
    )


def test_report_title_follows_the_evaluated_set(tmp_path: Path) -> None:
    title = "validation (in-sample, optimistic)"
    report = write_eval_report(
        _result(title, True, "bootstrap over 1,120 lesions"), ["mel"], tmp_path / "a.md"
    ).read_text()
    assert report.startswith(f"# LesionNet evaluation: {title}\n") and "**In-sample:**" in report
    assert f"): {title} sensitivity 0.900" in report and "test" not in report
    assert "95% intervals: bootstrap over 1,120 lesions, 1000 resamples." in report
    external = write_eval_report(
        _result("external", False, "bootstrap over images: lesion ids unknown (1,520 images)"),
        ["mel"],
        tmp_path / "b.md",
    ).read_text()
    assert external.startswith("# LesionNet evaluation: external\n") and "In-sample" not in external
    assert "over images: lesion ids unknown" in external and "test" not in external


def test_an_in_sample_report_never_calls_the_scored_images_unseen(tmp_path: Path) -> None:
    """In-sample scoring checks the scored images against the training images only: they are the validation images
    the models were chosen on, so the report must not claim they were neither trained nor validated on."""
    unseen = "no evaluated image is, by id, content or picture, one the models trained or were validated on"
    held_out = write_eval_report(_result("test", False, "bootstrap over 1,120 lesions"), ["mel"], tmp_path / "t.md")
    assert unseen in held_out.read_text()
    report = write_eval_report(
        _result("validation (in-sample, optimistic)", True, "bootstrap over 1,120 lesions"), ["mel"], tmp_path / "v.md"
    ).read_text()
    assert unseen not in report and "validated on" not in report
    assert "one the models trained on. They are not unseen: they are the validation images the models were chosen" in (
        report
    )


def test_the_report_shows_class_wise_ece_and_brier_beside_the_top_label_ece_and_the_shown_probabilities(
    tmp_path: Path,
) -> None:
    result = _result("test", False, "bootstrap over 1,120 lesions")
    assert result.scores is not None
    result.scores["m+posthoc-la"] = result.scores["m"].model_copy(
        update={
            "classwise_ece": 0.074,
            "brier": 0.41,
            "ece_after_temperature": 0.127,
            "classwise_ece_after_temperature": 0.071,
            "log_loss_after_temperature": 0.895,
            "brier_after_temperature": 0.40,
            "display": DisplayCalibration(
                method="prior-undo+temperature",
                scale=[2.0, 2.0],
                bias=[0.1, -0.1],
                validation_log_loss={"temperature": 0.9, "prior-undo+temperature": 0.7},
            ),
            "displayed": CalibrationFigures(ece=0.043, classwise_ece=0.0398, log_loss=0.676, brier=0.33),
        }
    )
    report = write_eval_report(result, ["mel"], tmp_path / "r.md").read_text()
    summary = next(line for line in report.splitlines() if line.startswith("| model") and "val balanced acc" in line)
    assert "| ECE" in summary and "| class-wise ECE" in summary and "| Brier" in summary
    calibration = report[report.index("## Calibration") : report.index("## Every set")]
    assert "| shown as" in calibration and "prior-undo+temperature" in calibration
    assert "| shown: class-wise ECE" in calibration and "| after T: class-wise ECE" in calibration
    for figure in ("0.074", "0.071", "0.040", "0.676", "0.330"):  # as scored, after T, as shown
        assert figure in calibration


def test_greedy_ensemble_selects_on_validation(runs: dict[str, Path], tmp_path: Path) -> None:
    result = evaluate(
        compose_eval(
            [f"ckpt=[{runs['baseline']},{runs['baseline_bn']}]", "ensemble=greedy", f"paths.output_dir={tmp_path}"]
        )
    )
    assert result.ensemble is not None and 1 <= len(result.ensemble.members) <= 2
    assert result.validation is not None and "validation split" in result.validation


def test_tta_flips_runs_and_views_are_the_flips() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = tta_views(x, "flips")
    assert len(views) == 4 and torch.equal(views[1], x.flip(3)) and torch.equal(views[3], x.flip(2, 3))
    d4 = tta_views(x, "d4")
    assert len({tuple(v.flatten().tolist()) for v in d4}) == 8
    with pytest.raises(ValueError, match="Unknown tta"):
        tta_views(x, "rotate")


def test_tta_changes_nothing_for_a_flip_invariant_input(runs: dict[str, Path], tmp_path: Path) -> None:
    result = evaluate(compose_eval([f"ckpt={runs['baseline']}", "tta=d4", f"paths.output_dir={tmp_path}"]))
    assert result.tta == "d4" and result.n_images > 0


def _external(runs: dict[str, Path], tmp_path: Path, fmt: str) -> tuple[Path, Path]:
    split = pd.read_csv(runs["baseline"] / "split.csv")
    test = split[split.split == "test"]
    images = tmp_path / "external"
    images.mkdir()
    for image_id in test.image_id:
        (images / f"{image_id}.jpg").write_bytes((runs["data"] / "images" / f"{image_id}.jpg").read_bytes())
    labels = tmp_path / "labels.csv"
    if fmt == "ham":
        test[["image_id", "dx"]].to_csv(labels, index=False)
    else:
        frame = pd.DataFrame({"image": test.image_id})
        for c in ISIC_COLUMNS:
            frame[c] = (test.dx.str.upper() == c).astype(float).to_numpy()
        frame.to_csv(labels, index=False)
    return images, labels


@pytest.mark.parametrize("fmt", ["ham", "isic"])
def test_external_labelled_set_scores_like_the_run_split(runs: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    images, labels = _external(runs, tmp_path, fmt)
    run = evaluate(compose_eval([f"ckpt={runs['baseline']}", f"paths.output_dir={tmp_path / 'a'}"]))
    ext = evaluate(
        compose_eval(
            [
                f"ckpt={runs['baseline']}",
                f"data.images={images}",
                f"data.labels={labels}",
                f"paths.output_dir={tmp_path / 'b'}",
            ]
        )
    )
    assert run.scores is not None and ext.scores is not None
    name = next(iter(run.scores))
    assert ext.scores[name].accuracy == pytest.approx(run.scores[name].accuracy)
    assert ext.scores[name].balanced_accuracy == pytest.approx(run.scores[name].balanced_accuracy)


def test_unlabelled_folder_gives_predictions_only(runs: dict[str, Path], tmp_path: Path) -> None:
    images, _ = _external(runs, tmp_path, "ham")
    result = evaluate(
        compose_eval([f"ckpt={runs['baseline']}", f"data.images={images}", f"paths.output_dir={tmp_path / 'out'}"])
    )
    assert result.scores is None and result.final is None
    assert len(pd.read_csv(next((tmp_path / "out").glob("predictions_*.csv")))) == len(list(images.glob("*.jpg")))


def test_isic_ground_truth_reader_maps_one_hot_to_codes(tmp_path: Path) -> None:
    path = tmp_path / "gt.csv"
    path.write_text("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_1,0,0,0,0,0,1.0,0\nISIC_2,1.0,0,0,0,0,0,0\n")
    assert read_labels(path).to_dict("list") == {"image_id": ["ISIC_1", "ISIC_2"], "dx": ["df", "mel"]}
    path.write_text("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_1,0.5,0.5,0,0,0,0,0\n")
    with pytest.raises(DatasetError, match="not one-hot"):
        read_labels(path)


def test_missing_checkpoint_and_foreign_files_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="Checkpoint not found"):
        resolve_checkpoints(str(tmp_path / "nope.ckpt"))
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(CheckpointError, match="is not a LesionNet checkpoint"):
        load_member(plain)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"hyper_parameters": {"backbone": "x"}, "payload": Path("/etc")}, pickled)  # an arbitrary object
    with pytest.raises(CheckpointError, match="untrusted pickles are refused"):
        load_member(pickled)


def test_checkpoints_trained_on_the_evaluated_images_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ProvenanceError, match="was trained or validated on .* image"):
        evaluate(compose_eval([f"ckpt=[{runs['baseline']},{runs['other_split']}]", f"paths.output_dir={tmp_path}"]))


def test_labels_without_images_and_unknown_classes_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    images, labels = _external(runs, tmp_path, "ham")
    frame = pd.read_csv(labels)
    pd.concat([frame, pd.DataFrame({"image_id": ["ISIC_missing"], "dx": ["nv"]})]).to_csv(labels, index=False)
    with pytest.raises(DatasetError, match=r"1 labelled image\(s\) have no file"):
        evaluate(
            compose_eval(
                [
                    f"ckpt={runs['baseline']}",
                    f"data.images={images}",
                    f"data.labels={labels}",
                    f"paths.output_dir={tmp_path / 'o'}",
                ]
            )
        )
    frame.assign(dx="melanoma").to_csv(labels, index=False)
    with pytest.raises(DatasetError, match="not among the model's classes"):
        evaluate(
            compose_eval(
                [
                    f"ckpt={runs['baseline']}",
                    f"data.images={images}",
                    f"data.labels={labels}",
                    f"paths.output_dir={tmp_path / 'p'}",
                ]
            )
        )


def test_empty_image_folder_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="No .jpg/.jpeg/.png images"):
        evaluate(
            compose_eval(
                [f"ckpt={runs['baseline']}", f"data.images={tmp_path / 'empty'}", f"paths.output_dir={tmp_path}"]
            )
        )


def test_train_scores_the_ema_weights_it_checkpointed(runs: dict[str, Path], tmp_path: Path) -> None:
    """With weight EMA, train.py's test figures are those of the saved (averaged) checkpoint."""
    run = tmp_path / "ema"
    train(
        compose_train(
            [
                f"data.root={runs['data']}",
                f"paths.output_dir={run}",
                "trainer.max_epochs=2",
                "callbacks=ema",
                "callbacks.ema.update_starting_at_epoch=0",
                "callbacks.ema.decay=0.5",
                *FAST,
            ]
        )
    )
    trained = json.loads((run / "metrics.json").read_text())["test"]
    scored = evaluate(compose_eval([f"ckpt={run}", f"paths.output_dir={tmp_path / 'eval'}"]))
    assert scored.scores is not None
    row = next(iter(scored.scores.values()))
    assert row.accuracy == pytest.approx(trained["test/acc"], abs=1e-6)
    assert row.balanced_accuracy == pytest.approx(trained["test/balanced_acc"], abs=1e-6)
    # AUROC depends on every probability, so it tells the averaged from the current weights
    assert row.macro_auroc == pytest.approx(trained["test/auroc"], abs=1e-5)


def copy_of_training_images(run: Path, data: Path, folder: Path, resize: bool) -> pd.DataFrame:
    """Training images of ``run`` under new names in ``folder`` (optionally resized and re-encoded), labelled."""
    split = pd.read_csv(run / "split.csv")
    train_ids = split.loc[split["split"] == "train"].head(6)
    folder.mkdir(parents=True)
    rows = []
    for k, row in enumerate(train_ids.itertuples()):
        image = Image.open(data / "images" / f"{row.image_id}.jpg")
        if resize:
            image = image.resize((image.width * 3, image.height * 3), Image.Resampling.BICUBIC)
        image.save(folder / f"holiday_{k}.jpg", quality=80 if resize else 95)
        rows.append({"image_id": f"holiday_{k}", "dx": row.dx})
    labels = pd.DataFrame(rows)
    labels.to_csv(folder.parent / f"{folder.name}.csv", index=False)
    return labels


@pytest.mark.parametrize("resize", [False, True], ids=["renamed", "renamed+resized"])
def test_renamed_training_images_in_an_external_set_are_refused(
    runs: dict[str, Path], tmp_path: Path, resize: bool
) -> None:
    folder = tmp_path / "external"
    copy_of_training_images(runs["baseline"], runs["data"], folder, resize)
    copied = tmp_path / "elsewhere" / "model.ckpt"  # a bare checkpoint, away from its run folder and split.csv
    copied.parent.mkdir()
    shutil.copy(next((runs["baseline"] / "checkpoints").glob("epoch_*.ckpt")), copied)
    for ckpt in (runs["baseline"], copied):
        with pytest.raises(ProvenanceError, match="was trained or validated on 6 image"):
            evaluate(
                compose_eval(
                    [
                        f"ckpt={ckpt}",
                        f"data.images={folder}",
                        f"data.labels={tmp_path / 'external.csv'}",
                        f"paths.output_dir={tmp_path / 'out'}",
                    ]
                )
            )


def test_checkpoint_without_provenance_needs_an_explicit_override(runs: dict[str, Path], tmp_path: Path) -> None:
    old = tmp_path / "old" / "checkpoints" / "old.ckpt"  # as written before checkpoints carried provenance
    old.parent.mkdir(parents=True)
    checkpoint = torch.load(next((runs["baseline"] / "checkpoints").glob("epoch_*.ckpt")), weights_only=True)
    del checkpoint["lesionnet_provenance"]
    torch.save(checkpoint, old)
    shutil.copy(runs["baseline"] / "split.csv", old.parent.parent / "split.csv")
    shutil.copy(runs["baseline"] / "metrics.json", old.parent.parent / "metrics.json")
    with pytest.raises(ProvenanceError, match="allow_unknown_provenance=true"):
        evaluate(compose_eval([f"ckpt={old}", f"paths.output_dir={tmp_path / 'a'}"]))
    result = evaluate(
        compose_eval([f"ckpt={old}", f"paths.output_dir={tmp_path / 'b'}", "allow_unknown_provenance=true"])
    )
    assert result.models[0].provenance.startswith("unknown")
    assert "**Provenance unknown** for" in (tmp_path / "b" / "report.md").read_text()


def test_scores_name_models_by_checkpoint_hash(runs: dict[str, Path], tmp_path: Path) -> None:
    result = evaluate(compose_eval([f"ckpt={runs['baseline']}", f"paths.output_dir={tmp_path}"]))
    (model,) = result.models
    assert model.sha256 == file_sha256(next((runs["baseline"] / "checkpoints").glob("epoch_*.ckpt")))
    assert model.provenance == "checked"
    assert read_scores(tmp_path / "scores.json").models[0].sha256 == model.sha256


def test_posthoc_logit_adjustment_adds_rows_fitted_on_validation(runs: dict[str, Path], tmp_path: Path) -> None:
    result = evaluate(
        compose_eval([f"ckpt={runs['baseline']}", "posthoc_logit_adjustment=true", f"paths.output_dir={tmp_path}"])
    )
    assert result.scores is not None
    (row,) = [name for name in result.scores if name.endswith("+posthoc-la")]
    fitted = result.scores[row].logit_adjustment
    assert fitted is not None and 0.0 <= fitted.tau <= 2.0 and sum(fitted.prior) == pytest.approx(1.0)
    assert (tmp_path / f"predictions_{row}.csv").is_file()
    # per-class calibration beside the top-label ECE, and how the app shows each row's probabilities
    written = json.loads((tmp_path / "scores.json").read_text())["scores"]
    for name, figures in written.items():
        assert {"classwise_ece", "brier", "classwise_ece_after_temperature", "brier_after_temperature"} <= set(figures)
        assert set(figures["displayed"]) == {"ece", "classwise_ece", "log_loss", "brier"}, name
    plain = result.scores[fitted.of].display
    adjusted = result.scores[row].display
    assert plain is not None and adjusted is not None
    if fitted.tau > 0:  # the adjustment is taken back out of what is shown (few validation images: no other family)
        assert adjusted.method == "prior-undo+temperature"
        probs = pd.read_csv(tmp_path / f"predictions_{row}.csv")[list(ISIC_COLUMNS)].to_numpy(float)
        order = [ISIC_COLUMNS.index(c.upper()) for c in CLASS_NAMES]
        shown = apply_scaling(probs[:, order], adjusted.scale, adjusted.bias)
        raw = pd.read_csv(tmp_path / f"predictions_{fitted.of}.csv")[list(ISIC_COLUMNS)].to_numpy(float)[:, order]
        np.testing.assert_allclose(shown, apply_scaling(raw, plain.scale, plain.bias), atol=1e-4)
    else:  # tau 0 changes nothing: nothing to undo
        assert adjusted.method == "temperature"
    report = (tmp_path / "report.md").read_text()
    assert "## Calibration" in report and "class-wise ECE" in report and "Brier" in report


def test_posthoc_logit_adjustment_of_an_ensemble_adds_its_own_row(runs: dict[str, Path], tmp_path: Path) -> None:
    both = f"ckpt=[{runs['baseline']},{runs['baseline_bn']}]"
    result = evaluate(compose_eval([both, "posthoc_logit_adjustment=true", f"paths.output_dir={tmp_path}"]))
    assert result.scores is not None
    rows = {name: s.logit_adjustment for name, s in result.scores.items() if name.endswith("+posthoc-la")}
    assert len(rows) == 3 and all(fitted is not None for fitted in rows.values())
    ensemble_row = rows["ensemble+posthoc-la"]
    assert ensemble_row is not None and ensemble_row.of == "ensemble"
    assert all(fitted is not None and fitted.prior == ensemble_row.prior for fitted in rows.values())  # one split
    assert result.scores["ensemble+posthoc-la"].validation is not None


def test_legacy_split_scores_split_by_whether_the_lesion_was_seen(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "legacy"
    train(
        compose_train(
            [
                f"data.root={runs['data']}",
                f"paths.output_dir={run}",
                "trainer.max_epochs=1",
                *FAST,
                "data.split=legacy",
                "test=false",
            ]
        )
    )
    result = evaluate(compose_eval([f"ckpt={run}", f"paths.output_dir={tmp_path / 'eval'}"]))
    assert result.scores is not None
    (breakdown,) = [s.seen_lesions for s in result.scores.values() if s.seen_lesions is not None]
    seen, unseen = breakdown["lesion_seen_in_training"], breakdown.get("lesion_not_seen")
    assert seen.n_images > 0 and seen.n_images + (unseen.n_images if unseen else 0) == result.n_images
    plain = evaluate(compose_eval([f"ckpt={runs['baseline']}", f"paths.output_dir={tmp_path / 'plain'}"]))
    assert plain.scores is not None
    assert all(s.seen_lesions is None for s in plain.scores.values())  # lesion split: no lesion is shared


def _external_set(runs: dict[str, Path], folder: Path, drop: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """The baseline run's test images (never trained or validated on) as an external folder with an image_id,dx
    labels file, less the classes in ``drop``."""
    split = pd.read_csv(runs["baseline"] / "split.csv")
    test = split[(split.split == "test") & ~split.dx.isin(drop)]
    images = folder / "images"
    images.mkdir(parents=True)
    for image_id in test.image_id:
        shutil.copy(runs["data"] / "images" / f"{image_id}.jpg", images / f"{image_id}.jpg")
    test[["image_id", "dx"]].to_csv(folder / "labels.csv", index=False)
    return images, folder / "labels.csv"


def test_two_external_sets_in_one_run_give_one_report_with_a_column_group_each(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """external=[derm7pt] (moved to a local folder) and an ad-hoc set, scored by every row (members, ensemble,
    post-hoc rows) with the thresholds chosen on validation: one scores.json, one table."""
    first = _external_set(runs, tmp_path / "first")
    second = _external_set(runs, tmp_path / "second", drop=("akiec",))
    out = tmp_path / "out"
    result = evaluate(
        compose_eval(
            [
                f"ckpt=[{runs['baseline']},{runs['baseline_bn']}]",
                "posthoc_logit_adjustment=true",
                "external=[derm7pt]",
                f"external.derm7pt.images={first[0]}",
                f"external.derm7pt.labels={first[1]}",
                f"+external.second={{images:{second[0]},labels:{second[1]}}}",
                f"paths.output_dir={out}",
            ]
        )
    )
    saved = read_scores(out / "scores.json")
    assert saved.schema_version == SCORES_VERSION and [e.name for e in saved.external] == ["derm7pt", "second"]
    verify_scores(saved, out / "scores.json")  # every row, the external sets' too, carries the digest of what it scored
    assert all(row.digest is not None for e in saved.external for row in (e.scores or {}).values())
    assert result.scores is not None and result.bootstrap is not None
    rows = list(result.scores)
    assert "ensemble" in rows and sum(r.endswith("+posthoc-la") for r in rows) == 3
    for external in saved.external:
        assert external.scores is not None and external.bootstrap is not None
        assert list(external.scores) == rows and external.bootstrap.unit == "images"
        folder = out / external.predictions
        assert external.predictions == f"external/{external.name}" and (folder / "ground_truth_isic.csv").is_file()
        for row in rows:
            preds = pd.read_csv(folder / f"predictions_{row}.csv")
            assert list(preds.columns) == ["image", *ISIC_COLUMNS] and len(preds) == external.n_images
            s, main = external.scores[row], result.scores[row]
            assert set(s.ci95) == {
                "accuracy",
                "balanced_accuracy",
                "mel_auroc",
                "mel_sensitivity",
                "mel_specificity",
            }
            # the referral threshold is the one chosen on validation, the same for every set
            assert s.at_val_threshold is not None and main.at_val_threshold is not None
            assert s.at_val_threshold.threshold == main.at_val_threshold.threshold
    derm7pt = saved.external[0]
    assert derm7pt.scores is not None
    for row in rows:  # derm7pt here holds exactly the run's test images: the same figures as the test group
        ours, test_row = derm7pt.scores[row], result.scores[row]
        assert ours.accuracy == pytest.approx(test_row.accuracy, abs=1e-6)
        assert ours.balanced_accuracy == pytest.approx(test_row.balanced_accuracy, abs=1e-6)
        assert ours.melanoma is not None and test_row.melanoma is not None
        assert ours.melanoma.auroc == pytest.approx(test_row.melanoma.auroc)
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if "mel threshold (val)" in line)
    groups = [header.index(f"| {name}: accuracy") for name in ("test", "derm7pt", "second")]
    assert groups == sorted(groups) and all(f"{g}: mel spec" in header for g in ("test", "derm7pt", "second"))
    assert "bootstrap over images: lesion ids unknown" in report
    second_line = rf"- \*\*second\*\*: {saved.external[1].n_images} images, external set second .*; predictions in"
    n_present = len(saved.external[1].classes_present or [])
    assert re.search(second_line + rf" external/second/; {n_present} of the 7 classes, \*\*no akiec\*\*", report)
    assert result.bootstrap.unit == "lesions"  # the run's split: lesions; external sets: images
    assert f"- **test**: {result.n_images} images; " in report and result.bootstrap.description in report


def test_an_external_set_without_a_class_is_balanced_over_the_classes_it_has(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    split = pd.read_csv(runs["baseline"] / "split.csv")
    assert "akiec" in set(split.loc[split.split == "test", "dx"])  # so leaving it out is a change
    images, labels = _external_set(runs, tmp_path / "noakiec", drop=("akiec",))
    out = tmp_path / "out"
    result = evaluate(
        compose_eval(
            [
                f"ckpt={runs['baseline']}",
                f"+external.noakiec={{images:{images},labels:{labels}}}",
                f"paths.output_dir={out}",
            ]
        )
    )
    (external,) = result.external
    truth = pd.read_csv(labels)
    present = sorted(set(truth.dx))
    assert "akiec" not in present and sorted(external.classes_present or []) == present
    assert external.scores is not None
    (row,) = external.scores
    preds = pd.read_csv(out / external.predictions / f"predictions_{row}.csv").set_index("image")
    predicted = preds.loc[truth.image_id, list(ISIC_COLUMNS)].to_numpy().argmax(axis=1)
    predicted_dx = np.array([c.lower() for c in ISIC_COLUMNS])[predicted]
    recalls = [np.mean(predicted_dx[truth.dx.to_numpy() == c] == c) for c in present]  # akiec: no recall at all
    s = external.scores[row]
    assert s.balanced_accuracy == pytest.approx(np.mean(recalls), abs=1e-6)
    assert s.per_class["akiec"].recall is None and s.per_class["akiec"].support == 0
    assert f"{len(present)} of the 7 classes, **no akiec**" in (out / "report.md").read_text()


def test_unknown_external_sets_and_missing_folders_are_refused_with_the_fix(tmp_path: Path) -> None:
    # Refused before any checkpoint is read: no model is needed to get the messages.
    ckpt = f"ckpt={tmp_path / 'any.ckpt'}"
    with pytest.raises(Exception, match="external/nope"):  # Hydra: no lesionnet/conf/external/nope.yaml
        compose_eval([ckpt, "external=[nope]"])
    cfg = compose_eval([ckpt, "external=[derm7pt]", f"paths.output_dir={tmp_path}"])
    assert cfg.external.derm7pt.images == "../shared/data/derm7pt/images"  # relative to where evaluate.py runs
    missing = tmp_path / "missing"
    with pytest.raises(DatasetError, match=r"derm7pt: image folder not found: .*external\.derm7pt\.images=FOLDER"):
        evaluate(compose_eval([ckpt, "external=[derm7pt]", f"external.derm7pt.images={missing}"]))
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"labels file not found: .*external\.derm7pt\.labels=CSV"):
        evaluate(
            compose_eval(
                [
                    ckpt,
                    "external=[derm7pt]",
                    f"external.derm7pt.images={tmp_path / 'images'}",
                    f"external.derm7pt.labels={tmp_path / 'x.csv'}",
                ]
            )
        )
    with pytest.raises(ValueError, match=r"external\.test: the name 'test' .*external\.test\.name=NAME"):
        evaluate(compose_eval([ckpt, f"+external.test={{images:{tmp_path / 'images'},labels:null}}"]))
    # an override of a set that was not selected, e.g. a mistyped name given with '+': no labels entry
    with pytest.raises(ValueError, match=r"external\.derm7p has no labels entry: select .*external=\[derm7pt\]"):
        evaluate(compose_eval([ckpt, f"+external.derm7p.images={tmp_path / 'images'}"]))


def test_scores_files_of_version_1_are_still_read(tmp_path: Path) -> None:
    """Version 2 added the external sets; a version 1 file is the same document without them (and, as version 2,
    without row digests: read for reports, refused by the app, tests/test_app.py)."""
    written = ScoresFile(evaluated="test split", set="test", n_images=3, models=[], tta="none")
    path = write_scores(written, tmp_path / "s.json")
    document = json.loads(path.read_text())
    del document["external"], document["classes_present"]
    path.write_text(json.dumps({**document, "schema_version": 1}))
    assert read_scores(path).external == [] and read_scores(path).schema_version == 1
    path.write_text(json.dumps({**document, "schema_version": 0}))
    with pytest.raises(ContractError, match="schema version 0"):
        read_scores(path)


def test_a_scores_row_with_a_bad_value_is_refused_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    """Rows are typed: a temperature of "hot" is refused when the file is read, not deep inside the app."""
    row = {
        "n": 2,
        "accuracy": 0.5,
        "balanced_accuracy": 0.5,
        "macro_f1": 0.5,
        "macro_auroc": None,
        "log_loss": 0.7,
        "ece": 0.1,
        "per_class": {},
        "confusion_matrix": [[1, 1], [0, 0]],
        "temperature": "hot",
    }
    written = ScoresFile(evaluated="test split", set="test", n_images=2, models=[], tta="none")
    path = write_scores(written, tmp_path / "scores.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), "scores": {"model": row}, "final": "model"}))
    with pytest.raises(
        ContractError, match=r"(?s)scores\.json is not a valid scores file.*temperature.*Run evaluate\.py"
    ):
        read_scores(path)
    row["temperature"] = 1.5
    path.write_text(json.dumps({**json.loads(path.read_text()), "scores": {"model": row}}))
    final = read_scores(path).final_scores
    assert final is not None and final.temperature == 1.5 and final.at_val_threshold is None


# ------------------------------------------------------ the leak guard holds against what training does to an image

# A copy of an image and the EXIF orientation it is saved with (6: pixels stored turned back, the tag turns them up).
Copy = Callable[[Image.Image], tuple[Image.Image, int | None]]
TRAINING_COPIES: dict[str, Copy] = {
    "horizontal flip": lambda im: (im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), None),
    "pixels rotated 90 + EXIF orientation 6": lambda im: (im.transpose(Image.Transpose.ROTATE_90), 6),
    "crop 10% off one side": lambda im: (im.crop((round(im.width * 0.1), 0, im.width, im.height)), None),
    "crop 5% each side": lambda im: (
        im.crop((round(im.width * 0.05), round(im.height * 0.05), round(im.width * 0.95), round(im.height * 0.95))),
        None,
    ),
}


def copies_of_split(run: Path, data: Path, folder: Path, split: str, make: Copy) -> Path:
    """Six images of ``split`` of ``run`` made into copies by ``make``, under new names in ``folder``, labelled
    (image_id,dx); returns the labels file."""
    table = pd.read_csv(run / "split.csv")
    chosen = table.loc[table["split"] == split].head(6)
    folder.mkdir(parents=True)
    for k, image_id in enumerate(chosen["image_id"]):
        with Image.open(data / "images" / f"{image_id}.jpg") as original:
            copy, orientation = make(original.convert("RGB"))
        exif = Image.Exif()
        if orientation is not None:
            exif[0x0112] = orientation
        copy.save(folder / f"copy_{k}.jpg", quality=90, exif=exif)
    labels = folder.parent / f"{folder.name}.csv"
    pd.DataFrame({"image_id": [f"copy_{k}" for k in range(len(chosen))], "dx": chosen["dx"]}).to_csv(
        labels, index=False
    )
    return labels


def evaluate_external(run: Path, images: Path, labels: Path, out: Path) -> ScoresFile:
    return evaluate(
        compose_eval([f"ckpt={run}", f"data.images={images}", f"data.labels={labels}", f"paths.output_dir={out}"])
    )


@pytest.mark.parametrize("name", list(TRAINING_COPIES))
def test_training_images_flipped_rotated_or_cropped_as_training_does_are_refused(
    runs: dict[str, Path], tmp_path: Path, name: str
) -> None:
    folder = tmp_path / "copies"
    labels = copies_of_split(runs["baseline"], runs["data"], folder, "train", TRAINING_COPIES[name])
    with pytest.raises(
        ProvenanceError,
        match=r"was trained or validated on 6 image.*flipped, rotated, cropped or colour-shifted: 6, e\.g\. copy_0 ~ ",
    ):
        evaluate_external(runs["baseline"], folder, labels, tmp_path / "out")


def test_flipped_validation_images_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "flipped_val"
    labels = copies_of_split(runs["baseline"], runs["data"], folder, "val", TRAINING_COPIES["horizontal flip"])
    with pytest.raises(ProvenanceError, match="was trained or validated on 6 image"):
        evaluate_external(runs["baseline"], folder, labels, tmp_path / "out")


def test_an_external_set_with_lesions_the_model_trained_on_is_refused_by_their_lesion_id(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """Other pictures of training lesions (no copy of a training image: no fingerprint matches) are refused by the
    lesion_id column of labels.csv."""
    split = pd.read_csv(runs["baseline"] / "split.csv")
    trained = split.loc[split["split"] == "train"].drop_duplicates("lesion_id").head(3)
    folder = tmp_path / "other_views"
    folder.mkdir()
    rng = np.random.default_rng(2323)
    for k in range(len(trained)):
        write_image(folder / f"other_view_{k}.jpg", rng, size=(80, 60), smooth=True)
    labels = tmp_path / "other_views.csv"
    frame = pd.DataFrame({"image_id": [f"other_view_{k}" for k in range(len(trained))], "dx": trained["dx"]})
    frame.assign(lesion_id=trained["lesion_id"].to_numpy()).to_csv(labels, index=False)
    lesions = re.escape(", ".join(sorted(trained["lesion_id"])))
    with pytest.raises(
        ProvenanceError, match=rf"trained or validated on 3 lesion\(s\).*{lesions}.*Remove those lesions"
    ):
        evaluate_external(runs["baseline"], folder, labels, tmp_path / "out")
    frame.to_csv(labels, index=False)  # without lesion ids the pictures are unknown to the record: scored
    assert evaluate_external(runs["baseline"], folder, labels, tmp_path / "out2").n_images == len(trained)


def test_unseen_test_images_with_lesion_ids_score_and_their_intervals_resample_lesions(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    images, labels = _external_set(runs, tmp_path / "unseen")
    split = pd.read_csv(runs["baseline"] / "split.csv").set_index("image_id")
    frame = pd.read_csv(labels)
    frame.assign(lesion_id=split.loc[frame["image_id"], "lesion_id"].to_numpy()).to_csv(labels, index=False)
    result = evaluate_external(runs["baseline"], images, labels, tmp_path / "out")
    assert result.scores is not None and result.bootstrap is not None
    assert result.bootstrap.unit == "lesions"
    assert result.bootstrap.n_units == split.loc[frame["image_id"], "lesion_id"].nunique()
