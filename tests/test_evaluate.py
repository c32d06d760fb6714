"""evaluate.py: single models, ensembles, external sets, TTA and every refusal, on checkpoints trained here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lesionnet.data.metadata import DatasetError
from lesionnet.evaluation.checkpoints import CheckpointError, load_member, resolve_checkpoints
from lesionnet.evaluation.datasets import ISIC_COLUMNS, read_labels
from lesionnet.evaluation.predict import tta_views
from lesionnet.evaluation.runner import evaluate
from lesionnet.training import train
from tests.conftest import make_ham_dir
from tests.test_train import CONF, FAST, compose_train


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two short training runs on one synthetic dataset and one split, plus one run on another split."""
    base = tmp_path_factory.mktemp("eval")
    data = make_ham_dir(base / "ham")
    out = {"data": data}
    for name, overrides in {
        "baseline": ["model=baseline"],
        "baseline_bn": ["model=baseline_bn", "data.image_size=[32,40]"],
        "other_split": ["model=baseline", "data.split_seed=7"],
    }.items():
        out[name] = base / name
        train(compose_train([f"data.root={data}", f"paths.output_dir={out[name]}", "trainer.max_epochs=1", *FAST,
                             *overrides]))
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
    for file in result["plots"].values():
        assert (tmp_path / file).stat().st_size > 1000
    report = (tmp_path / "report.md").read_text()
    assert "balanced acc [95% CI]" in report and all(f"]({f})" in report for f in result["plots"].values())


def test_ensemble_is_the_average_of_member_probabilities(runs: dict[str, Path], tmp_path: Path) -> None:
    both = f"ckpt=[{runs['baseline']},{runs['baseline_bn']}]"
    result = evaluate(compose_eval([both, f"paths.output_dir={tmp_path}"]))
    assert len(result["ensemble"]["members"]) == 2 and result["final"] == "ensemble"
    cols = list(ISIC_COLUMNS)
    members = [pd.read_csv(tmp_path / f"predictions_{n}.csv")[cols].to_numpy() for n in result["ensemble"]["members"]]
    ensemble = pd.read_csv(tmp_path / "predictions_ensemble.csv")[cols].to_numpy()
    np.testing.assert_allclose(ensemble, (members[0] + members[1]) / 2, atol=2e-6)  # CSV keeps 6 decimals
    assert set(result["scores"]) == {*result["ensemble"]["members"], "ensemble"}  # singles reported too


def test_greedy_ensemble_selects_on_validation(runs: dict[str, Path], tmp_path: Path) -> None:
    result = evaluate(compose_eval([f"ckpt=[{runs['baseline']},{runs['baseline_bn']}]", "ensemble=greedy",
                                    f"paths.output_dir={tmp_path}"]))
    assert 1 <= len(result["ensemble"]["members"]) <= 2
    assert "validation split" in result["validation"]


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
    assert result["tta"] == "d4" and result["n_images"] > 0


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
    ext = evaluate(compose_eval([f"ckpt={runs['baseline']}", f"data.images={images}", f"data.labels={labels}",
                                 f"paths.output_dir={tmp_path / 'b'}"]))
    name = next(iter(run["scores"]))
    assert ext["scores"][name]["accuracy"] == pytest.approx(run["scores"][name]["accuracy"])
    assert ext["scores"][name]["balanced_accuracy"] == pytest.approx(run["scores"][name]["balanced_accuracy"])


def test_unlabelled_folder_gives_predictions_only(runs: dict[str, Path], tmp_path: Path) -> None:
    images, _ = _external(runs, tmp_path, "ham")
    result = evaluate(compose_eval([f"ckpt={runs['baseline']}", f"data.images={images}",
                                    f"paths.output_dir={tmp_path / 'out'}"]))
    assert "scores" not in result
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
    with pytest.raises(CheckpointError, match="was trained on .* image"):
        evaluate(compose_eval([f"ckpt=[{runs['baseline']},{runs['other_split']}]", f"paths.output_dir={tmp_path}"]))


def test_labels_without_images_and_unknown_classes_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    images, labels = _external(runs, tmp_path, "ham")
    frame = pd.read_csv(labels)
    pd.concat([frame, pd.DataFrame({"image_id": ["ISIC_missing"], "dx": ["nv"]})]).to_csv(labels, index=False)
    with pytest.raises(DatasetError, match=r"1 labelled image\(s\) have no file"):
        evaluate(compose_eval([f"ckpt={runs['baseline']}", f"data.images={images}", f"data.labels={labels}",
                               f"paths.output_dir={tmp_path / 'o'}"]))
    frame.assign(dx="melanoma").to_csv(labels, index=False)
    with pytest.raises(DatasetError, match="not among the model's classes"):
        evaluate(compose_eval([f"ckpt={runs['baseline']}", f"data.images={images}", f"data.labels={labels}",
                               f"paths.output_dir={tmp_path / 'p'}"]))


def test_empty_image_folder_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="No .jpg/.jpeg/.png images"):
        evaluate(compose_eval([f"ckpt={runs['baseline']}", f"data.images={tmp_path / 'empty'}",
                               f"paths.output_dir={tmp_path}"]))


def test_train_scores_the_ema_weights_it_checkpointed(runs: dict[str, Path], tmp_path: Path) -> None:
    """With weight EMA, train.py's test figures are those of the saved (averaged) checkpoint."""
    run = tmp_path / "ema"
    train(compose_train([f"data.root={runs['data']}", f"paths.output_dir={run}", "trainer.max_epochs=2",
                         "callbacks=ema", "callbacks.ema.update_starting_at_epoch=0", "callbacks.ema.decay=0.5",
                         *FAST]))
    trained = json.loads((run / "metrics.json").read_text())["test"]
    scored = evaluate(compose_eval([f"ckpt={run}", f"paths.output_dir={tmp_path / 'eval'}"]))
    name = next(iter(scored["scores"]))
    assert scored["scores"][name]["accuracy"] == pytest.approx(trained["test/acc"], abs=1e-6)
    assert scored["scores"][name]["balanced_accuracy"] == pytest.approx(trained["test/balanced_acc"], abs=1e-6)
    # AUROC depends on every probability, so it tells the averaged from the current weights
    assert scored["scores"][name]["macro_auroc"] == pytest.approx(trained["test/auroc"], abs=1e-5)
