"""Out-of-fold predictions of a cross-validation sweep (``lesionnet oof``): the CV figures and the honest fits.

In a sweep ``python train.py -m ... data.folds=K 'data.fold=range(K)'`` every train+val image is held out by exactly
one fold run. Predicted by that run's model (the one model that did not train on it), the K held-out folds together
give out-of-fold predictions for all train+val images: the CV estimate (mean ± sd over folds, and pooled) and a set
K times larger than one validation split to fit the temperature and the melanoma threshold on. Those values are
fitted on the K fold models' out-of-fold predictions and applied to their ensemble: the usual approximation, said
as such in every output. The test split is never read here; it stays for ``python evaluate.py ckpt=<sweep>``.
Each fold's held-out images are checked against its checkpoint's provenance (:mod:`lesionnet.evaluation.guard`): a
checkpoint that trained on them (swapped or copied from another fold run) is refused.
``oof_scores.json``'s schema, writer and reader are :mod:`lesionnet.contract.oof`.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from lesionnet.contract.files import ContractError
from lesionnet.contract.oof import FittedValue, FoldRun, MeanSd, OofScores, write_oof_scores
from lesionnet.contract.provenance import ProvenanceError
from lesionnet.contract.run import RunMetrics
from lesionnet.data.run_folder import RunFolder
from lesionnet.data.split import load_folds
from lesionnet.evaluation import metrics
from lesionnet.evaluation.guard import check_provenance
from lesionnet.evaluation.runner import score
from lesionnet.inference import Member, Predictor, load_members

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "oof_predictions.csv"
SCORES_FILE = "oof_scores.json"
CV_METRICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_auroc")
FIXED_EPOCHS = "Train the folds with fixed epochs and their last weights: callbacks=cv (experiment=cv_baseline_cpu)."
APPROXIMATION = (
    "Fitted on out-of-fold predictions of the {k} fold models; applied to their ensemble — the usual approximation. "
    "The ensemble averages {k} models and is usually less over-confident than any one of them, so values fitted on "
    "single fold models may be slightly off for it; the only images none of the {k} models trained on are the test "
    "split's, which stay for scoring."
)


def fold_of(run: RunFolder, run_metrics: RunMetrics) -> tuple[int, int]:
    """(fold, K) of a fold run, from its metrics.json; any other run is refused."""
    folds = (run_metrics.config.get("data") or {}).get("folds")
    if run_metrics.fold is None or folds is None:
        raise ContractError(
            f"{run.path} is not a cross-validation fold run (its metrics.json has no fold). Give the multirun folder "
            "of python train.py -m ... callbacks=cv data.folds=K 'data.fold=range(K)'."
        )
    return run_metrics.fold, int(folds)


def check_fixed_epochs(run: RunFolder, run_metrics: RunMetrics) -> None:
    """Refuse a fold whose model was chosen on its own held-out fold (early stopping or a monitored checkpoint)."""
    callbacks = run_metrics.config.get("callbacks") or {}
    targets = {name: str(c.get("_target_", "")) for name, c in callbacks.items() if isinstance(c, dict)}
    chosen = [name for name, target in targets.items() if target.endswith("EarlyStopping")]
    chosen += [
        f"{name} (monitor {callbacks[name]['monitor']})"
        for name, target in targets.items()
        if target.endswith("ModelCheckpoint") and callbacks[name].get("monitor")
    ]
    if chosen:
        raise ContractError(
            f"{run.path} chose its model on its own held-out fold ({', '.join(chosen)}), so its out-of-fold "
            f"predictions would be optimistic. {FIXED_EPOCHS}"
        )


def sweep_runs(sweep: Path) -> tuple[list[RunFolder], int, int]:
    """The fold runs of a sweep ordered by fold, K and the split seed; incomplete or mixed sweeps are refused."""
    if not sweep.is_dir():
        raise ContractError(
            f"Sweep folder not found: {sweep}. Give the multirun folder of the fold runs: "
            "sweep=logs/<task>/multiruns/<date>_<time>."
        )
    by_fold: dict[int, RunFolder] = {}
    folds: set[int] = set()
    seeds: set[int] = set()
    for path in sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file()):
        run = RunFolder(path)
        run_metrics = run.metrics()
        fold, k = fold_of(run, run_metrics)
        check_fixed_epochs(run, run_metrics)
        if fold in by_fold:
            raise ContractError(
                f"Fold {fold} was trained twice in {sweep}: {by_fold[fold].path} and {run.path}. Give a sweep with "
                "one run per fold (move the other run out of the folder)."
            )
        by_fold[fold] = run
        folds.add(k)
        seeds.add(int(run_metrics.config["data"]["split_seed"]))
    if not by_fold:
        raise ContractError(
            f"No finished run (metrics.json) under {sweep}. Give the multirun folder of python train.py -m ... "
            "callbacks=cv data.folds=K 'data.fold=range(K)'."
        )
    if len(folds) > 1 or len(seeds) > 1:
        raise ContractError(
            f"{sweep} mixes cross-validations (data.folds {sorted(folds)}, data.split_seed {sorted(seeds)}). Give "
            "the sweep of one cross-validation."
        )
    k = folds.pop()
    missing = sorted(set(range(k)) - set(by_fold))
    if missing:
        raise ContractError(
            f"{sweep} lacks fold(s) {missing} of {k} (no finished run): every train+val image needs the model that "
            f"held it out. Train them with the sweep's overrides and 'data.fold={','.join(map(str, missing))}', or "
            "resume a killed fold in its folder: python train.py <its overrides> hydra.run.dir=<its folder> "
            "ckpt_path=last."
        )
    return [by_fold[i] for i in range(k)], k, seeds.pop()


def check_same_folds(runs: list[RunFolder]) -> pd.Series:
    """The fold of every image (one assignment shared by all runs, <NA> for test), as the runs' split.csv say."""
    reference = load_folds(runs[0].split_file).sort_index()
    for run in runs[1:]:
        if not load_folds(run.split_file).sort_index().equals(reference):
            raise ContractError(
                f"{run.split_file} deals the images into other folds (or another test split) than "
                f"{runs[0].split_file}: the runs are not folds of one cross-validation. Train every fold on the same "
                "data with the same data.split_seed and data.folds."
            )
    return reference


def held_out_table(run: RunFolder, fold: int, assignment: pd.Series, data_root: str | None) -> pd.DataFrame:
    """The run's val split, checked to be exactly its fold of the shared assignment."""
    table = run.split_table("val", data_root)
    expected = set(assignment.index[(assignment == fold).fillna(False).astype(bool)])
    if set(table["image_id"]) != expected:
        raise ContractError(
            f"The val split of {run.split_file} is not fold {fold} of the cross-validation ({len(table)} images, "
            f"{len(expected)} in the fold). Retrain that fold with data.fold={fold}."
        )
    return table


def check_held_out(member: Member, table: pd.DataFrame, fold: int, allow_unknown: bool) -> list[str]:
    """Refuse a fold checkpoint that trained on any of the fold's held-out images (by id, content or picture); returns
    the held-out images that are HAM10000's own duplicates (another id) of its training images, to leave out."""
    try:
        _, _, duplicates = check_provenance(
            [member], table, f"held-out fold {fold}", None, None, allow_unknown=allow_unknown, in_sample=True
        )
    except ProvenanceError as err:
        if member.provenance is None:
            raise
        raise ProvenanceError(
            f"{err} Fold {fold}'s checkpoint must be the model that held fold {fold} out: put back the fold run's own "
            f"checkpoint (not one swapped or copied from another fold run), or retrain the fold with data.fold={fold}."
        ) from err
    if duplicates["target"]:
        log.warning(
            "Fold %d: %d held-out image(s) left out, the same photo as a training image of %s under another id "
            "(a duplicate in the dataset): %s",
            fold,
            len(duplicates["target"]),
            member.name,
            duplicates["target"],
        )
    return duplicates["target"]


def predict_fold(
    member: Member, table: pd.DataFrame, fold: int, class_names: list[str], batch_size: int, num_workers: int
) -> pd.DataFrame:
    """One row per held-out image: ids, label, fold, the predicting model and its probabilities (one column a class)."""
    prediction = Predictor([member]).predict_paths(
        table["path"].tolist(), batch_size=batch_size, num_workers=num_workers, desc=f"fold {fold}"
    )
    rows = table[["image_id", "lesion_id", "dx"]].reset_index(drop=True)
    rows = rows.assign(fold=fold, run=member.run.name if member.run else "", checkpoint_sha256=member.sha256)
    return pd.concat([rows, pd.DataFrame(prediction.probs, columns=class_names)], axis=1)


def cv_summary(per_fold: list[dict[str, float | None]]) -> dict[str, MeanSd]:
    """Mean ± sample sd over folds of each CV metric (folds where it is undefined are left out and counted)."""
    summary = {}
    for name in CV_METRICS:
        values = [value for s in per_fold if (value := s[name]) is not None]
        summary[name] = MeanSd(
            mean=float(np.mean(values)) if values else None,
            sd=float(np.std(values, ddof=1)) if len(values) > 1 else None,
            n_folds=len(values),
        )
    return summary


def test_command(sweep: Path, data_root: str | None) -> str:
    """The evaluate.py command that scores the K fold models' mean ensemble on the (untouched) test split."""
    words = ["python", "evaluate.py", f"ckpt={sweep}", "ensemble=mean"]
    return shlex.join(words + ([f"data.root={data_root}"] if data_root else []))


def out_of_fold(cfg: DictConfig) -> OofScores:
    """Predict every fold's held-out images with that fold's model; write oof_predictions.csv and oof_scores.json."""
    sweep = Path(cfg.sweep).expanduser()
    out = Path(cfg.paths.output_dir)
    runs, k, split_seed = sweep_runs(sweep)
    assignment = check_same_folds(runs)
    members = load_members([str(run.path) for run in runs], device=cfg.device)
    class_names = members[0].class_names
    parts: list[pd.DataFrame] = []
    fold_runs: list[FoldRun] = []
    left_out: list[str] = []
    for fold, (run, member) in enumerate(zip(runs, members, strict=True)):
        table = held_out_table(run, fold, assignment, cfg.data.root)
        duplicates = check_held_out(member, table, fold, bool(cfg.get("allow_unknown_provenance", False)))
        left_out += duplicates
        table = table[~table["image_id"].isin(duplicates)].reset_index(drop=True)
        part = predict_fold(member, table, fold, class_names, cfg.data.batch_size, cfg.data.num_workers)
        probs, targets = part[class_names].to_numpy(), part["dx"].map(class_names.index).to_numpy()
        fold_scores = metrics.classification_scores(probs, targets, class_names)
        fold_runs.append(
            FoldRun(
                fold=fold,
                run=str(run.path),
                checkpoint=str(member.path),
                sha256=member.sha256,
                epoch=member.epoch,
                n_images=len(part),
                n_lesions=part["lesion_id"].nunique(),
                scores={name: fold_scores[name] for name in CV_METRICS},
            )
        )
        parts.append(part)
        log.info("Fold %d: %d held-out images predicted by %s", fold, len(part), member.path)
    oof = pd.concat(parts, ignore_index=True)
    expected = set(assignment.index[assignment.notna()]) - set(left_out)
    if oof["image_id"].duplicated().any() or set(oof["image_id"]) != expected:
        raise ContractError(f"The folds of {sweep} do not cover every train+val image exactly once.")

    probs, targets = oof[class_names].to_numpy(), oof["dx"].map(class_names.index).to_numpy()
    pooled = score(probs, targets, class_names, cfg, lesion_ids=oof["lesion_id"].astype(str).to_numpy())
    fitted_on = (
        f"out-of-fold predictions of the {k} fold models ({len(oof)} train+val images, each predicted by the one "
        "model that did not train on it)"
    )
    command = test_command(sweep, cfg.data.root)
    applies_to = f"the mean ensemble of the {k} fold models ({command})"
    temperature = FittedValue(value=metrics.fit_temperature(probs, targets), fitted_on=fitted_on, applies_to=applies_to)
    threshold = None
    if "mel" in class_names and (targets == class_names.index("mel")).any():
        value = metrics.threshold_for_sensitivity(probs, targets, class_names.index("mel"), cfg.mel_target_sensitivity)
        threshold = FittedValue(value=value, fitted_on=fitted_on, applies_to=applies_to)
    result = OofScores(
        sweep=str(sweep),
        folds=k,
        split_seed=split_seed,
        n_images=len(oof),
        n_lesions=oof["lesion_id"].nunique(),
        class_names=class_names,
        runs=fold_runs,
        cv=cv_summary([f.scores for f in fold_runs]),
        pooled=pooled,
        temperature=temperature,
        melanoma_threshold=threshold,
        mel_target_sensitivity=cfg.mel_target_sensitivity,
        approximation=APPROXIMATION.format(k=k),
        test_command=command,
    )
    out.mkdir(parents=True, exist_ok=True)
    oof.to_csv(out / PREDICTIONS_FILE, index=False, float_format="%.9f")
    write_oof_scores(result, out / SCORES_FILE)
    log.info("Written to %s", out)
    return result


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary_text(result: OofScores, out_dir: str | Path) -> str:
    """What ``lesionnet oof`` prints: per-fold and pooled figures, the fitted values and whom they are for."""
    names = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_auroc": "macro AUROC"}
    lines = [
        f"Cross-validation of {result.folds} folds ({result.sweep}): {result.n_images} train+val images of "
        f"{result.n_lesions} lesions, each predicted by the one fold model that did not train on it.",
        "",
        f"{'fold':<6}{'images':>8}{'accuracy':>11}{'balanced acc':>14}{'macro AUROC':>13}  run",
    ]
    for run in result.runs:
        figures = [_figure(run.scores[name]) for name in CV_METRICS]
        lines.append(f"{run.fold:<6}{run.n_images:>8}{figures[0]:>11}{figures[1]:>14}{figures[2]:>13}  {run.run}")
    lines += ["", f"CV mean ± sd over {result.folds} folds:"]
    for name in CV_METRICS:
        summary = result.cv[name]
        lines.append(f"  {names[name]:<18} {_figure(summary.mean)} ± {_figure(summary.sd)}")
    lines.append(f"Pooled out-of-fold ({result.n_images} images; 95% CI: bootstrap over {result.n_lesions} lesions):")
    for name in CV_METRICS:
        low, high = result.pooled.ci95.get(name, (None, None))
        interval = f"  [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
        lines.append(f"  {names[name]:<18} {_figure(getattr(result.pooled, name))}{interval}")
    lines += ["", result.approximation]
    lines.append(f"  temperature         {result.temperature.value:.3f}")
    if result.melanoma_threshold is not None:
        lines.append(
            f"  melanoma threshold  {result.melanoma_threshold.value:.4f} "
            f"(P(mel) >= it refers; {result.mel_target_sensitivity:.0%} sensitivity on the out-of-fold predictions)"
        )
    lines += [
        "",
        f"Score the {result.folds} fold models as an ensemble on the test split (not used above):",
        f"  {result.test_command}",
        f"Written: {Path(out_dir) / PREDICTIONS_FILE}, {Path(out_dir) / SCORES_FILE}",
    ]
    return "\n".join(lines)
