"""Cross-validation: lesion-grouped, class-stratified folds inside train+val, fixed epochs, out-of-fold predictions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from lesionnet.contract.files import ContractError
from lesionnet.contract.oof import FittedValue, FoldRun, MeanSd, OofScores, read_oof_scores, write_oof_scores
from lesionnet.contract.provenance import ProvenanceError
from lesionnet.contract.scores import ScoresRow
from lesionnet.data.datamodule import HAM10000DataModule
from lesionnet.data.metadata import DatasetError, load_ham10000
from lesionnet.data.run_folder import RunFolder
from lesionnet.data.split import (
    assign_folds,
    check_fold_settings,
    fold_split,
    load_folds,
    load_split,
    save_split,
    split_lesions,
)
from lesionnet.evaluation.oof import PREDICTIONS_FILE, SCORES_FILE, out_of_fold, sweep_runs
from lesionnet.inference import Predictor, load_members
from lesionnet.training import train
from tests.conftest import CONF, FAST, compose_train, make_ham_dir

FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
LESIONNET = Path(sys.executable).parent / "lesionnet"  # the console script of `pip install -e .`


@pytest.fixture
def table(make_ham) -> pd.DataFrame:
    """11 lesions per class: 2 in test, 9 to deal into folds."""
    return load_ham10000(make_ham(lesions_per_class=11))


def _dm(root: Path, **kwargs) -> HAM10000DataModule:
    return HAM10000DataModule(
        backbone="lesionnet_baseline", root=str(root), split_fractions=FRACTIONS, num_workers=0, **kwargs
    )


def test_every_train_val_lesion_is_held_out_by_exactly_one_fold(table: pd.DataFrame) -> None:
    split = split_lesions(table, FRACTIONS, seed=0)
    fold = assign_folds(table, split, folds=4, seed=0)
    assert fold[split == "test"].isna().all() and fold[split != "test"].notna().all()
    assert (table.assign(fold=fold)[split != "test"].groupby("lesion_id")["fold"].nunique() == 1).all()
    held_out = []
    for i in range(4):
        run = fold_split(split, fold, i)
        assert run[split == "test"].eq("test").all() and not run[split != "test"].eq("test").any()
        assert set(table.lesion_id[run == "val"]) & set(table.lesion_id[run == "train"]) == set()
        held_out += sorted(set(table.lesion_id[run == "val"]))
    assert sorted(held_out) == sorted(set(table.lesion_id[split != "test"]))  # each lesion once, none twice


def test_folds_are_stratified_by_class_within_one_lesion(table: pd.DataFrame) -> None:
    split = split_lesions(table, FRACTIONS, seed=0)
    lesions = table.assign(fold=assign_folds(table, split, folds=4, seed=0)).dropna(subset="fold")
    per_class = pd.crosstab(lesions.drop_duplicates("lesion_id")["dx"], lesions.drop_duplicates("lesion_id")["fold"])
    assert per_class.shape == (7, 4) and (per_class.max(axis=1) - per_class.min(axis=1) <= 1).all()
    assert per_class.sum().max() - per_class.sum().min() <= 1  # fold sizes in lesions, too


def test_folds_repeat_with_the_seed_and_not_with_the_row_order(table: pd.DataFrame) -> None:
    split = split_lesions(table, FRACTIONS, seed=3)
    fold = assign_folds(table, split, folds=3, seed=3)
    assert fold.equals(assign_folds(table, split, folds=3, seed=3))
    assert not fold.equals(assign_folds(table, split, folds=3, seed=4))
    shuffled = table.assign(split=split).sample(frac=1.0, random_state=0)
    again = assign_folds(shuffled, shuffled["split"], folds=3, seed=3)
    assert again.sort_index().equals(fold.sort_index())


def test_test_split_is_the_one_without_folds(make_ham) -> None:
    root = make_ham(lesions_per_class=11)
    plain = _dm(root, split_seed=7)
    plain.setup()
    test_images = set(plain.table.image_id[plain.table.split == "test"])
    held_out = []
    for i in range(3):
        dm = _dm(root, split_seed=7, folds=3, fold=i)
        dm.setup()
        by_split = {s: set(dm.table.image_id[dm.table.split == s]) for s in ("train", "val", "test")}
        assert by_split["test"] == test_images
        assert by_split["val"] == set(dm.table.image_id[dm.table.fold == i])
        assert len(dm.datasets["val"]) == len(by_split["val"]) and len(dm.datasets["test"]) == len(test_images)
        held_out += sorted(by_split["val"])
    assert sorted(held_out) == sorted(set(plain.table.image_id) - test_images)


def test_split_file_records_the_folds_and_keeps_its_format(make_ham, tmp_path: Path) -> None:
    dm = _dm(make_ham(), folds=2, fold=1)
    path = dm.save_split(tmp_path / "split.csv")
    assert list(pd.read_csv(path).columns) == ["image_id", "lesion_id", "dx", "split", "fold", "schema_version"]
    assert load_folds(path).equals(dm.table.set_index("image_id")["fold"])
    assert load_split(dm.table.drop(columns=["split", "fold"]), path).equals(dm.table["split"])
    again = _dm(Path(dm.root), folds=2, fold=1, split_seed=42, split_file=str(path))  # its folds are dealt again
    again.setup()
    assert again.table["split"].equals(dm.table["split"]) and again.table["fold"].equals(dm.table["fold"])
    plain = save_split(dm.table.drop(columns="fold"), tmp_path / "plain.csv")
    with pytest.raises(DatasetError, match="no fold column: it was not written by a cross-validation run"):
        load_folds(plain)


def test_a_fold_column_without_a_fold_for_every_train_val_image_is_refused(make_ham, tmp_path: Path) -> None:
    dm = _dm(make_ham(), folds=2, fold=0)
    path = dm.save_split(tmp_path / "split.csv")
    saved = pd.read_csv(path, dtype=str)
    test_image = saved.index[saved["split"] == "test"][0]
    for spoilt in (saved.assign(fold=saved["fold"].where(saved["split"] == "test", "1.5")), saved.copy()):
        spoilt.loc[test_image, "fold"] = "0"  # second round: only a test image given a fold
        spoilt.to_csv(path, index=False)
        with pytest.raises(ContractError, match=r"fold values that are not whole numbers >= 0 .*Retrain"):
            load_folds(path)
    without_version = saved.drop(columns="schema_version")  # a fold run's split.csv from before the version column
    without_version.to_csv(path, index=False)
    assert load_folds(path).equals(dm.table.set_index("image_id")["fold"])


def test_oof_scores_round_trip_and_another_version_is_refused_with_the_fix(tmp_path: Path) -> None:
    fitted = FittedValue(value=1.3, fitted_on="out-of-fold predictions", applies_to="the mean ensemble")
    scores = OofScores(
        sweep="logs/train/multiruns/x",
        folds=2,
        split_seed=42,
        n_images=10,
        n_lesions=8,
        class_names=["mel", "nv"],
        runs=[FoldRun(fold=0, run="0", checkpoint="c", sha256="s", epoch=3, n_images=5, n_lesions=4, scores={})],
        cv={"accuracy": MeanSd(mean=0.5, sd=None, n_folds=1)},
        pooled=ScoresRow(
            n=10,
            accuracy=0.5,
            balanced_accuracy=0.5,
            macro_f1=0.5,
            macro_auroc=None,
            log_loss=0.7,
            ece=0.1,
            per_class={},
            confusion_matrix=[[5, 0], [5, 0]],
        ),
        temperature=fitted,
        melanoma_threshold=None,
        mel_target_sensitivity=0.9,
        approximation="the usual approximation",
        test_command="python evaluate.py",
    )
    path = write_oof_scores(scores, tmp_path / "oof_scores.json")
    assert read_oof_scores(path) == scores
    path.write_text(json.dumps({**json.loads(path.read_text()), "schema_version": 2}))
    with pytest.raises(ContractError, match=r"schema version 2 .*Re-run `lesionnet oof sweep=<the sweep>`"):
        read_oof_scores(path)


@pytest.mark.parametrize(
    "folds, fold, message",
    [
        (None, 1, r"data.fold=1 needs data.folds=K"),
        (5, None, r"data.folds=5 needs data.fold=i.*'data.fold=range\(5\)'"),
        (1, 0, r"data.folds must be >= 2"),
        (3, 3, r"data.fold must lie in \[0, 3\) for data.folds=3, got 3"),
        (3, -1, r"data.fold must lie in \[0, 3\)"),
    ],
)
def test_bad_fold_settings_fail_at_construction(ham_dir: Path, folds: int | None, fold: int | None, message: str):
    with pytest.raises(ValueError, match=message):
        check_fold_settings(folds, fold)
    with pytest.raises(ValueError, match=message):
        _dm(ham_dir, folds=folds, fold=fold)


def test_class_with_fewer_lesions_than_folds_names_the_class_and_the_fix(make_ham) -> None:
    dm = _dm(make_ham(lesions_per_class=4), folds=4, fold=0)  # 1 test lesion per class, 3 to deal into 4 folds
    with pytest.raises(DatasetError, match=r"Class 'akiec' has 3 lesion\(s\) outside the test split.*data.folds=3"):
        dm.setup()


def test_legacy_split_cannot_be_cross_validated(ham_dir: Path) -> None:
    with pytest.raises(ValueError, match="data.split=legacy splits by image"):
        _dm(ham_dir, split="legacy", folds=2, fold=0)


def _callback_targets(cfg) -> dict[str, str]:
    return {name: c.get("_target_", "") for name, c in cfg.callbacks.items()}


def test_cv_configs_keep_the_last_epoch_without_early_stopping() -> None:
    cfg = compose_train(["experiment=cv_baseline_cpu"])
    targets = _callback_targets(cfg)
    assert not any(t.endswith("EarlyStopping") for t in targets.values())
    assert [n for n, t in targets.items() if t.endswith("ModelCheckpoint")] == ["model_checkpoint"]
    assert cfg.callbacks.model_checkpoint.monitor is None and cfg.callbacks.model_checkpoint.filename == "last"
    assert (cfg.data.folds, cfg.data.fold, cfg.model.backbone) == (5, 0, "lesionnet_baseline")
    # callbacks=cv on the command line wins over an experiment's own callbacks (cpu_lite0_all: ema + early stopping)
    lite = compose_train(["experiment=cpu_lite0_all", "callbacks=cv", "data.folds=5", "data.fold=0"])
    assert not any(t.endswith(("EarlyStopping", "EMAWeightAveraging")) for t in _callback_targets(lite).values())


# ----------------------------------------------------------------------------- a 2-fold sweep and its out-of-fold


@pytest.fixture(scope="module")
def fold_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 1-epoch fold runs laid out as Hydra's multirun does (``<sweep>/<job number>``), trained in-process."""
    base = tmp_path_factory.mktemp("folds")
    ham = make_ham_dir(base / "ham")  # 6 lesions a class: 1 in test, 5 in the folds
    for fold in range(2):
        overrides = [f"data.root={ham}", f"paths.output_dir={base / 'sweep' / str(fold)}", "trainer.max_epochs=1"]
        train(compose_train([*overrides, *FAST, "callbacks=cv", "data.folds=2", f"data.fold={fold}"]))
    return base / "sweep"


def _compose_oof(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("oof", overrides=["data.num_workers=0", "device=cpu", "bootstrap=50", *overrides])


def test_fold_runs_record_their_fold_and_score_their_last_epoch(fold_sweep: Path) -> None:
    for fold in range(2):
        run = RunFolder(fold_sweep / str(fold))
        metrics = run.metrics()
        assert metrics.fold == fold and Path(metrics.best_checkpoint).name == "last.ckpt"
        assert run.best_checkpoint() == run.path / "checkpoints" / "last.ckpt"
        assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == ["last.ckpt"]
        assigned = load_folds(run.split_file)
        assert set(run.split_table("val")["image_id"]) == set(assigned.index[assigned == fold])


def test_oof_predicts_every_train_val_image_once_by_the_model_that_held_it_out(fold_sweep: Path, tmp_path: Path):
    result = out_of_fold(_compose_oof([f"sweep={fold_sweep}", f"paths.output_dir={tmp_path}"]))
    oof = pd.read_csv(tmp_path / PREDICTIONS_FILE, dtype={"image_id": str, "run": str})
    folds = load_folds(fold_sweep / "0" / "split.csv")
    assert not oof["image_id"].duplicated().any()
    assert set(oof["image_id"]) == set(folds.index[folds.notna()])  # every train+val image, no test image
    assert (oof.set_index("image_id")["fold"] == folds.loc[oof["image_id"]].to_numpy()).all()

    members = load_members([str(fold_sweep / str(i)) for i in range(2)], device="cpu")
    for fold, member in enumerate(members):
        rows = oof[oof["fold"] == fold]
        assert (rows["checkpoint_sha256"] == member.sha256).all() and (rows["run"] == str(fold)).all()
        record = dict(zip(member.provenance.image_id, member.provenance.split, strict=True))
        assert {record[i] for i in rows["image_id"]} == {"val"}  # held out by this model, trained on by the other
        assert {split for i, split in record.items() if i in set(oof.loc[oof["fold"] != fold, "image_id"])} == {"train"}
        paths = RunFolder(member.run.path).split_table("val").set_index("image_id").loc[rows["image_id"], "path"]
        direct = Predictor([member]).predict_paths(paths.tolist()).probs
        np.testing.assert_allclose(rows[result.class_names].to_numpy(), direct, atol=1e-8)

    saved = read_oof_scores(tmp_path / SCORES_FILE)
    assert saved == result and saved.schema_version == 1 and (saved.folds, saved.n_images) == (2, len(oof))
    per_fold = [run.scores["balanced_accuracy"] for run in saved.runs]
    assert saved.cv["balanced_accuracy"].mean == pytest.approx(np.mean(per_fold))
    assert saved.cv["balanced_accuracy"].sd == pytest.approx(np.std(per_fold, ddof=1))
    assert saved.pooled.n == len(oof) and set(saved.pooled.ci95) >= {"accuracy", "balanced_accuracy"}
    for fitted in (saved.temperature, saved.melanoma_threshold):
        assert fitted.fitted_on.startswith("out-of-fold predictions of the 2 fold models")
        assert fitted.applies_to.startswith("the mean ensemble of the 2 fold models")
    assert "applied to their ensemble — the usual approximation" in saved.approximation
    assert saved.test_command == f"python evaluate.py ckpt={fold_sweep} ensemble=mean"


def test_oof_command_prints_the_figures_the_fits_and_the_test_command(fold_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "oof"
    result = subprocess.run(
        [str(LESIONNET), "oof", f"sweep={fold_sweep}", f"hydra.run.dir={out}", "data.num_workers=0", "bootstrap=50"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CV mean ± sd over 2 folds" in result.stdout and "Pooled out-of-fold" in result.stdout
    assert "Fitted on out-of-fold predictions of the 2 fold models; applied to their ensemble" in result.stdout
    assert f"python evaluate.py ckpt={fold_sweep} ensemble=mean" in result.stdout
    assert (out / PREDICTIONS_FILE).is_file() and (out / SCORES_FILE).is_file()


def _copy_records(sweep: Path, dest: Path, folds: tuple[int, ...] = (0, 1)) -> Path:
    """The fold runs' metrics.json and split.csv (no checkpoints): enough for the checks made before loading."""
    for fold in folds:
        (dest / str(fold)).mkdir(parents=True)
        for name in ("metrics.json", "split.csv"):
            shutil.copy(sweep / str(fold) / name, dest / str(fold) / name)
    return dest


def test_oof_refuses_fold_checkpoints_swapped_between_folds(fold_sweep: Path, tmp_path: Path) -> None:
    sweep = shutil.copytree(fold_sweep, tmp_path / "sweep")
    first, second = (sweep / str(fold) / "checkpoints" / "last.ckpt" for fold in range(2))
    first.rename(tmp_path / "last.ckpt")
    second.rename(first)
    (tmp_path / "last.ckpt").rename(second)  # each fold's model now trained on the fold it is asked to predict
    with pytest.raises(ProvenanceError, match=r"was trained on \d+ image\(s\) of the held-out fold 0.*data.fold=0"):
        out_of_fold(_compose_oof([f"sweep={sweep}", f"paths.output_dir={tmp_path / 'oof'}"]))
    assert not (tmp_path / "oof" / PREDICTIONS_FILE).exists()


def test_oof_refuses_an_incomplete_sweep(fold_sweep: Path, tmp_path: Path) -> None:
    with pytest.raises(ContractError, match=r"lacks fold\(s\) \[1\] of 2.*'data.fold=1'"):
        sweep_runs(_copy_records(fold_sweep, tmp_path / "sweep", folds=(0,)))
    with pytest.raises(ContractError, match="Sweep folder not found"):
        sweep_runs(tmp_path / "nowhere")


def test_oof_refuses_folds_whose_model_was_chosen_on_the_held_out_fold(fold_sweep: Path, tmp_path: Path) -> None:
    sweep = _copy_records(fold_sweep, tmp_path / "sweep")
    metrics_file = sweep / "1" / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["config"]["callbacks"]["early_stopping"] = {"_target_": "lightning.pytorch.callbacks.EarlyStopping"}
    metrics["config"]["callbacks"]["model_checkpoint"]["monitor"] = "val/balanced_acc"
    metrics_file.write_text(json.dumps(metrics))
    with pytest.raises(ContractError, match=r"chose its model on its own held-out fold \(early_stopping.*callbacks=cv"):
        sweep_runs(sweep)


def test_oof_refuses_runs_that_are_not_folds(fold_sweep: Path, tmp_path: Path) -> None:
    sweep = _copy_records(fold_sweep, tmp_path / "sweep")
    metrics_file = sweep / "0" / "metrics.json"
    metrics_file.write_text(json.dumps({**json.loads(metrics_file.read_text()), "fold": None}))
    with pytest.raises(ContractError, match="0 is not a cross-validation fold run"):
        sweep_runs(sweep)


def test_evaluate_scores_the_fold_ensemble_on_the_test_split(fold_sweep: Path, tmp_path: Path) -> None:
    from lesionnet.evaluation.runner import evaluate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[f"ckpt={fold_sweep}", f"paths.output_dir={tmp_path}", "data.num_workers=0", "device=cpu"],
        )
    summary = evaluate(cfg)
    assert summary.set == "test" and summary.ensemble is not None and summary.ensemble.members
    assert len(summary.models) == 2
