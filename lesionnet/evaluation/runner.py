"""The pipeline behind evaluate.py: checkpoints -> probabilities -> ensemble -> scores, plots and report.

Everything chosen from data (ensemble members, the melanoma referral threshold, the temperature) is
chosen on the training run's validation split and only then applied to the evaluated set.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from lesionnet.evaluation import metrics as M
from lesionnet.evaluation import plots
from lesionnet.evaluation.checkpoints import CheckpointError, Member, load_member, resolve_checkpoints
from lesionnet.evaluation.datasets import (
    external_table,
    run_split_table,
    write_isic_ground_truth,
    write_isic_predictions,
)
from lesionnet.evaluation.predict import predict_probs
from lesionnet.evaluation.report import write_report

log = logging.getLogger(__name__)
ENSEMBLE = "ensemble"


@dataclass
class EvalSet:
    """Images to score (``table`` with image_id, path and, when labelled, dx) and what they are."""

    table: pd.DataFrame
    description: str

    @property
    def labelled(self) -> bool:
        return "dx" in self.table.columns

    def targets(self, class_names: Sequence[str]) -> np.ndarray:
        return self.table["dx"].map({c: i for i, c in enumerate(class_names)}).to_numpy()


def _same_classes(members: Sequence[Member]) -> list[str]:
    names = {tuple(m.class_names) for m in members}
    if len(names) > 1:
        raise CheckpointError(f"Class set mismatch between checkpoints: {sorted(names)}. Ensemble like with like.")
    return list(names.pop())


def _data_root(cfg: DictConfig, run: Path) -> str:
    if cfg.data.root:
        return str(cfg.data.root)
    metrics = run / "metrics.json"
    if metrics.is_file():
        return json.loads(metrics.read_text())["data_root"]
    raise CheckpointError(f"No data.root given and {run} has no metrics.json recording one: pass data.root=...")


def build_sets(cfg: DictConfig, members: Sequence[Member], class_names: list[str]) -> tuple[EvalSet, EvalSet | None]:
    """The set to score and the validation set used for selection and calibration (None if unavailable)."""
    run = next((m.run_dir for m in members if m.run_dir is not None), None)
    val = None
    if run is not None:
        root = _data_root(cfg, run)
        val = EvalSet(run_split_table(run, root, "val"), f"validation split of {run}")
    if cfg.data.images:
        table = external_table(cfg.data.images, cfg.data.labels, class_names)
        target = EvalSet(table, f"external set {cfg.data.images}" + ("" if cfg.data.labels else " (unlabelled)"))
    elif run is not None:
        target = EvalSet(run_split_table(run, root, cfg.data.split), f"{cfg.data.split} split of {run}")
    else:
        raise CheckpointError(
            "The checkpoint is not inside a train.py run folder (no split.csv beside checkpoints/): give an "
            "external set with data.images=FOLDER [data.labels=CSV]."
        )
    if target.table.empty:
        raise CheckpointError(f"Nothing to evaluate: the {target.description} is empty.")
    return target, val


def training_overlap(member: Member, table: pd.DataFrame) -> dict[str, int]:
    """Images and lesions of ``table`` that ``member`` was trained on (images: must be 0)."""
    if member.run_dir is None:
        return {}
    split = pd.read_csv(member.run_dir / "split.csv", dtype=str)
    train = split[split["split"] == "train"]
    out = {"images": int(table["image_id"].isin(train["image_id"]).sum())}
    if "lesion_id" in table.columns:
        out["lesions"] = len(set(table["lesion_id"]) & set(train["lesion_id"]))
    return out


def guard_overlap(members: Sequence[Member], sets: Sequence[EvalSet | None]) -> dict[str, dict[str, int]]:
    """Refuse to score a model on images it trained on; report lesion overlap (legacy splits) instead."""
    report: dict[str, dict[str, int]] = {}
    for member in members:
        for eval_set in filter(None, sets):
            overlap = training_overlap(member, eval_set.table)
            if overlap.get("images"):
                raise CheckpointError(
                    f"{member.name} was trained on {overlap['images']} image(s) of the {eval_set.description}. "
                    "Checkpoints from runs with different splits cannot be scored on one split; use runs that share "
                    "a split (train.py data.split_file=...)."
                )
            report.setdefault(member.name, {}).update({f"{k}_{eval_set.description}": v for k, v in overlap.items()})
    return report


def score(probs: np.ndarray, targets: np.ndarray, class_names: list[str], cfg: DictConfig,
          val_probs: np.ndarray | None = None, val_targets: np.ndarray | None = None) -> dict[str, Any]:
    """All metrics of one model (or ensemble), with CIs and the validation-chosen operating points."""
    scores = M.classification_scores(probs, targets, class_names)
    scores["ci95"] = {
        "accuracy": list(M.bootstrap_ci(probs, targets, M.accuracy, n_boot=cfg.bootstrap, seed=cfg.seed)),
        "balanced_accuracy": list(M.bootstrap_ci(probs, targets, M.balanced_accuracy, n_boot=cfg.bootstrap,
                                                 seed=cfg.seed)),
    }
    if "mel" in class_names:
        mel = class_names.index("mel")
        scores["melanoma"] = {"argmax": M.sensitivity_specificity(probs, targets, mel)}
        if val_probs is not None and (val_targets == mel).any():
            threshold = M.threshold_for_sensitivity(val_probs, val_targets, mel, cfg.mel_target_sensitivity)
            scores["melanoma"]["val_threshold"] = {
                "target_sensitivity": cfg.mel_target_sensitivity,
                **M.sensitivity_specificity(probs, targets, mel, threshold),
            }
    if val_probs is not None:
        temperature = M.fit_temperature(val_probs, val_targets)
        calibrated = M.classification_scores(M.apply_temperature(probs, temperature), targets, class_names)
        scores["temperature"] = temperature
        scores["ece_after_temperature"] = calibrated["ece"]
        scores["log_loss_after_temperature"] = calibrated["log_loss"]
    return scores


def ensemble_members(cfg: DictConfig, val_probs: dict[str, np.ndarray], val_targets: np.ndarray | None,
                     names: list[str]) -> list[str]:
    """Which members form the ensemble: all (``mean``) or greedy forward selection on validation."""
    if cfg.ensemble == "mean":
        return names
    if cfg.ensemble == "greedy":
        if val_targets is None:
            raise CheckpointError("ensemble=greedy selects on the validation split, which needs checkpoints from "
                                  "a train.py run folder.")
        return M.greedy_selection({n: val_probs[n] for n in names}, val_targets, metric=cfg.greedy_metric)
    raise ValueError(f"Unknown ensemble '{cfg.ensemble}'; use none, mean or greedy.")


def _weights(cfg: DictConfig, chosen: list[str], names: list[str]) -> list[float] | None:
    if cfg.ensemble_weights is None:
        return None
    weights = list(cfg.ensemble_weights)
    if len(weights) != len(names):
        raise ValueError(f"ensemble_weights has {len(weights)} values for {len(names)} checkpoints.")
    return [weights[names.index(n)] for n in chosen]


def write_plots(out: Path, probs: np.ndarray, targets: np.ndarray, class_names: list[str],
                temperature: float | None) -> dict[str, str]:
    cm = np.asarray(M.classification_scores(probs, targets, class_names)["confusion_matrix"])
    files = {
        "confusion_counts": plots.plot_confusion_matrix(cm, class_names, out / "confusion_counts.png", normalize=False),
        "confusion_normalised": plots.plot_confusion_matrix(cm, class_names, out / "confusion_normalised.png",
                                                            normalize=True),
        "roc": plots.plot_roc_curves(probs, targets, class_names, out / "roc.png"),
        "reliability": plots.plot_reliability_diagram(
            probs, targets, out / "reliability.png",
            calibrated=M.apply_temperature(probs, temperature) if temperature is not None else None,
        ),
    }
    return {k: Path(v).name for k, v in files.items()}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score checkpoints (and their ensemble) and write predictions, scores.json, plots and report.md."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto"
                                                                                else cfg.device)
    paths = resolve_checkpoints(OmegaConf.to_container(cfg.ckpt) if not isinstance(cfg.ckpt, str) else cfg.ckpt)
    members = [load_member(p, device=device) for p in paths]
    class_names = _same_classes(members)
    target, val = build_sets(cfg, members, class_names)
    overlap = guard_overlap(members, [target, val])
    names = [m.name for m in members]
    log.info("Evaluating %s on the %s (%d images)", names, target.description, len(target.table))

    def predict(table: pd.DataFrame, what: str) -> dict[str, np.ndarray]:
        return {m.name: predict_probs(m.model, table["path"].tolist(), tta=cfg.tta, batch_size=cfg.data.batch_size,
                                      num_workers=cfg.data.num_workers, desc=f"{m.name} {what}") for m in members}

    probs = predict(target.table, "eval")
    val_probs = predict(val.table, "val") if val is not None else {}
    val_targets = val.targets(class_names) if val is not None else None
    chosen: list[str] = []
    if len(members) > 1 and cfg.ensemble != "none":
        chosen = ensemble_members(cfg, val_probs, val_targets, names)
        weights = _weights(cfg, chosen, names)
        probs[ENSEMBLE] = M.average_probs([probs[n] for n in chosen], weights)
        if val is not None:
            val_probs[ENSEMBLE] = M.average_probs([val_probs[n] for n in chosen], weights)

    for name, p in probs.items():
        write_isic_predictions(target.table["image_id"], p, class_names, out / f"predictions_{name}.csv")
    result: dict[str, Any] = {
        "evaluated": target.description, "n_images": len(target.table), "checkpoints": {m.name: str(m.path)
                                                                                        for m in members},
        "tta": cfg.tta, "ensemble": {"mode": cfg.ensemble, "members": chosen}, "training_overlap": overlap,
        "validation": val.description if val is not None else None,
    }
    if target.labelled:
        write_isic_ground_truth(target.table["image_id"], target.table["dx"], out / "ground_truth_isic.csv")
        targets = target.targets(class_names)
        result["scores"] = {
            name: score(p, targets, class_names, cfg, val_probs.get(name), val_targets) for name, p in probs.items()
        }
        final = ENSEMBLE if ENSEMBLE in probs else names[0]
        result["final"] = final
        result["plots"] = write_plots(out, probs[final], targets, class_names,
                                      result["scores"][final].get("temperature"))
    (out / "scores.json").write_text(json.dumps(result, indent=2))
    if target.labelled:
        write_report(result, class_names, out / "report.md")
    log.info("Written to %s", out)
    return result
