"""The pipeline behind evaluate.py: checkpoints -> probabilities -> ensemble -> scores, plots and report.

Everything chosen from data (ensemble members and weights, the melanoma referral threshold, the temperature) is
chosen on the training run's validation split and only then applied to the evaluated set. Scoring that validation
split itself is refused unless asked for explicitly (``in_sample=true``), and is then titled as optimistic.

External sets (``external=[derm7pt,...]``, see :func:`external_specs`) are scored in the same run by the same rows
(members, ensemble, post-hoc rows), with the same validation-chosen members, weights, tau and threshold: nothing is
fitted on them. Each is checked against the checkpoints' provenance like the main set, its predictions go to
``external/<name>/`` and its scores to ``scores.json``'s ``external``; report.md puts every set side by side.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from lesionnet.contract.scores import (
    ENSEMBLE,
    POSTHOC_LA,
    BootstrapRecord,
    CalibrationFigures,
    DisplayCalibration,
    EnsembleRecord,
    ExternalSetScores,
    FittedAdjustment,
    GroupFigures,
    MelanomaScores,
    OperatingPoint,
    ScoredModel,
    ScoresFile,
    ScoresRow,
    ValidationFigures,
    ValidationThreshold,
    write_scores,
)
from lesionnet.data.isic import write_isic_ground_truth, write_isic_predictions
from lesionnet.data.metadata import DatasetError
from lesionnet.evaluation import metrics, plots
from lesionnet.evaluation.eval_report import write_eval_report
from lesionnet.evaluation.external_sets import external_table
from lesionnet.evaluation.guard import check_provenance
from lesionnet.inference import CheckpointError, Member, Predictor, load_members
from lesionnet.inference.decision.combine import apply_scaling, apply_temperature, combine

log = logging.getLogger(__name__)
ENSEMBLE_MODES: tuple[str, ...] = ("none", "mean", "greedy", "fit")
# What report.md and scores.json call each scorable split of a training run.
SPLIT_TITLES: dict[str, str] = {"test": "test", "val": "validation (in-sample, optimistic)"}
EXTERNAL_DIR = "external"  # external/<name>/: each external set's predictions and ground truth
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # external set names become folder names and column groups
RESERVED_SET_NAMES: tuple[str, ...] = ("test", "external")  # the main set's column group (its title)


@dataclass
class EvalSet:
    """Images to score (``table`` with image_id, path and, when labelled, dx and lesion_id) and what they are.

    ``title`` is the short name reports use for the set ("test", "validation (in-sample, optimistic)", "external");
    ``description`` adds where it comes from.
    """

    table: pd.DataFrame
    description: str
    title: str

    @property
    def labelled(self) -> bool:
        return "dx" in self.table.columns

    @property
    def lesion_ids(self) -> np.ndarray | None:
        """One lesion id per image where every image has one (run splits), else None (e.g. external folders)."""
        if "lesion_id" not in self.table.columns or self.table["lesion_id"].isna().any():
            return None
        return self.table["lesion_id"].astype(str).to_numpy()

    def targets(self, class_names: Sequence[str]) -> np.ndarray:
        return self.table["dx"].map({c: i for i, c in enumerate(class_names)}).to_numpy()


@dataclass(frozen=True)
class ExternalSpec:
    """One external set as configured: ``name`` (its folder and column group), an image folder and its labels
    (None: predictions only). Paths are as given: relative ones are from the directory evaluate.py runs in."""

    name: str
    images: str
    labels: str | None

    @property
    def description(self) -> str:
        labels = f", labels {self.labels}" if self.labels else ", unlabelled"
        return f"external set {self.name} ({self.images}{labels})"


def configured_external_sets() -> list[str]:
    """The names ``external=[...]`` can pick: the files of the config group lesionnet/conf/external/."""
    folder = resources.files("lesionnet.conf").joinpath(EXTERNAL_DIR)
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def external_specs(cfg: DictConfig) -> list[ExternalSpec]:
    """The external sets to score beside the main set, checked before any model is loaded.

    ``cfg.external`` maps a key to ``{name, images, labels}``: what ``external=[derm7pt]`` composes from
    lesionnet/conf/external/derm7pt.yaml (``external.derm7pt.images=FOLDER`` moves it), or an ad-hoc
    ``+external.NAME={images:FOLDER,labels:CSV}``. Every image folder and labels file must exist; errors say
    which setting to change.
    """
    entries = cfg.get("external") or {}
    if not isinstance(entries, Mapping):
        raise ValueError(
            f"external must map set names to {{name, images, labels}}, got {entries!r}: pick configured sets with "
            f"external=[{','.join(configured_external_sets())}] (lesionnet/conf/external/<name>.yaml)."
        )
    specs: list[ExternalSpec] = []
    for key, entry in entries.items():
        pick = (
            f"select a configured set with external=[{','.join(configured_external_sets())}] "
            "(lesionnet/conf/external/<name>.yaml), or give a whole entry: "
            f"'+external.{key}={{images:FOLDER,labels:CSV}}'"
        )
        if not isinstance(entry, Mapping) or not entry.get("images"):
            raise ValueError(f"external.{key} has no image folder (images): {pick}.")
        if "labels" not in entry:
            raise ValueError(
                f"external.{key} has no labels entry: {pick} (labels: null scores nothing, predictions only)."
            )
        name = str(entry.get("name") or key)
        if not SET_NAME.fullmatch(name) or name in RESERVED_SET_NAMES:
            raise ValueError(
                f"external.{key}: the name {name!r} becomes a folder and a column group; use letters, digits, "
                f"'_', '-' and '.' only, and none of {', '.join(RESERVED_SET_NAMES)} (the main set's column group): "
                f"external.{key}.name=NAME."
            )
        spec = ExternalSpec(name, str(entry["images"]), str(entry["labels"]) if entry["labels"] else None)
        if name in {other.name for other in specs}:
            raise ValueError(f"Two external sets are named {name!r}; give each its own name (external.{key}.name).")
        where = f"relative paths are from the directory evaluate.py is started in, {Path.cwd()}"
        if not Path(spec.images).is_dir():
            raise DatasetError(
                f"External set {name}: image folder not found: {spec.images} ({where}). Put the images there or "
                f"point to them with external.{key}.images=FOLDER."
            )
        if spec.labels is not None and not Path(spec.labels).is_file():
            raise DatasetError(
                f"External set {name}: labels file not found: {spec.labels} ({where}). Put it there or point to "
                f"it with external.{key}.labels=CSV (external.{key}.labels=null: predictions only)."
            )
        specs.append(spec)
    return specs


def check_config(cfg: DictConfig) -> None:
    """Refuse, before any model is loaded, settings that would score optimistically or that are no longer read."""
    if "ensemble_weights" in cfg:
        raise ValueError(
            "ensemble_weights is no longer read: ensemble weights are now fitted on validation (non-negative, summing "
            "to 1, minimising validation log loss). Remove ensemble_weights and pass ensemble=fit."
        )
    if cfg.ensemble not in ENSEMBLE_MODES:
        raise ValueError(f"Unknown ensemble '{cfg.ensemble}'; use one of {', '.join(ENSEMBLE_MODES)}.")
    if cfg.data.images:
        return  # an external set: data.split is not used
    if cfg.data.split not in SPLIT_TITLES:
        raise ValueError(f"data.split={cfg.data.split} cannot be scored; use data.split=test (or val, see in_sample).")
    if cfg.data.split == "val" and not cfg.get("in_sample", False):
        raise ValueError(
            "data.split=val scores the very images that chose the ensemble, its weights, the melanoma threshold and "
            "the temperature, so its figures are optimistic. Score data.split=test, or set in_sample=true to score "
            "the validation split anyway (it is then titled 'validation (in-sample, optimistic)')."
        )


def build_sets(cfg: DictConfig, members: Sequence[Member], class_names: list[str]) -> tuple[EvalSet, EvalSet | None]:
    """The set to score and the validation set used for selection and calibration (None if unavailable)."""
    runs = [m.run for m in members if m.run is not None]
    run = runs[0] if runs else None
    val = None
    if run is not None and len({r.split_ids("val") for r in runs}) > 1:
        log.warning(
            "The checkpoints were validated on different images (e.g. cross-validation folds): there is no validation "
            "set none of them trained on, so no threshold, temperature or ensemble weights are fitted here. For fold "
            "models use the out-of-fold fits of `lesionnet oof`."
        )
    elif run is not None:
        val = EvalSet(run.split_table("val", cfg.data.root), f"validation split of {run.path}", "validation")
    if cfg.data.images:
        table = external_table(cfg.data.images, cfg.data.labels, class_names)
        title = "external" + ("" if cfg.data.labels else " (unlabelled)")
        target = EvalSet(table, f"{title} set {cfg.data.images}", title)
    elif run is not None:
        title = SPLIT_TITLES[cfg.data.split]
        target = EvalSet(run.split_table(cfg.data.split, cfg.data.root), f"{title} split of {run.path}", title)
    else:
        raise CheckpointError(
            "The checkpoint is not inside a train.py run folder (no split.csv beside checkpoints/), so it has no "
            "split to score: give an external set with data.images=FOLDER [data.labels=CSV] (sets of external=[...] "
            "are scored beside it)."
        )
    if target.table.empty:
        raise CheckpointError(f"Nothing to evaluate: the {target.description} is empty.")
    return target, val


def bootstrap_unit(eval_set: EvalSet, n_boot: int) -> BootstrapRecord:
    """What the confidence intervals resample: lesions where their ids are known (images of one lesion are
    correlated, so resampling them singly gives too narrow intervals), images otherwise; said in scores.json."""
    lesions = eval_set.lesion_ids
    if lesions is None:
        n_images = len(eval_set.table)
        return BootstrapRecord(
            unit="images",
            n_units=n_images,
            resamples=n_boot,
            description=f"bootstrap over images: lesion ids unknown ({n_images:,} images)",
        )
    n_lesions = len(set(lesions))
    return BootstrapRecord(
        unit="lesions", n_units=n_lesions, resamples=n_boot, description=f"bootstrap over {n_lesions:,} lesions"
    )


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def melanoma_metrics(mel: int, threshold: float | None) -> dict[str, metrics.Metric]:
    """The melanoma figures whose intervals are drawn (``ci95`` keys): one-vs-rest AUROC and, at a threshold fixed
    beforehand (chosen on validation), sensitivity and specificity. NaN where a resample leaves one undefined
    (no melanoma drawn), which the bootstrap skips."""

    def auroc(probs: np.ndarray, targets: np.ndarray) -> float:
        # P(mel) against the rest as a two-column problem: the melanoma AUROC of per_class_auroc, at a third the cost
        two = np.stack([1.0 - probs[:, mel], probs[:, mel]], axis=1)
        return _or_nan(metrics.per_class_auroc(two, (targets == mel).astype(np.int64))[1])

    def at_threshold(key: str) -> metrics.Metric:
        return lambda p, t: _or_nan(metrics.sensitivity_specificity(p, t, mel, threshold)[key])

    found: dict[str, metrics.Metric] = {"mel_auroc": auroc}
    if threshold is not None:
        found["mel_sensitivity"] = at_threshold("sensitivity")
        found["mel_specificity"] = at_threshold("specificity")
    return found


def score(
    probs: np.ndarray,
    targets: np.ndarray,
    class_names: list[str],
    cfg: DictConfig,
    val_probs: np.ndarray | None = None,
    val_targets: np.ndarray | None = None,
    lesion_ids: np.ndarray | None = None,
    display: DisplayCalibration | None = None,
) -> ScoresRow:
    """All metrics of one model (or ensemble), with CIs (resampling lesions when ``lesion_ids`` are given, images
    otherwise) and the validation-chosen operating points; with ``display`` (fitted on validation by
    :func:`fit_display_calibrations`), how calibrated the probabilities the app shows for the row are.

    ``ci95`` holds accuracy and balanced accuracy (mean recall over the classes ``targets`` has) and, where defined,
    melanoma AUROC and sensitivity/specificity at the validation threshold (``mel_auroc``, ``mel_sensitivity``,
    ``mel_specificity``). Only ``val_probs``/``val_targets`` choose anything; ``probs``/``targets`` are only scored.
    """
    row = ScoresRow.model_validate(metrics.classification_scores(probs, targets, class_names))
    intervals: dict[str, metrics.Metric] = {
        "accuracy": metrics.accuracy,
        "balanced_accuracy": metrics.balanced_accuracy,
    }
    if "mel" in class_names:
        mel = class_names.index("mel")
        row.melanoma = MelanomaScores(
            argmax=OperatingPoint(**metrics.sensitivity_specificity(probs, targets, mel)),
            auroc=row.per_class["mel"].auroc,
        )
        threshold = None
        if val_probs is not None and val_targets is not None and (val_targets == mel).any():
            threshold = metrics.threshold_for_sensitivity(val_probs, val_targets, mel, cfg.mel_target_sensitivity)
            row.melanoma.val_threshold = ValidationThreshold(
                target_sensitivity=cfg.mel_target_sensitivity,
                **metrics.sensitivity_specificity(probs, targets, mel, threshold),
            )
        at_threshold = row.melanoma.val_threshold
        defined = {
            "mel_auroc": row.melanoma.auroc,
            "mel_sensitivity": at_threshold.sensitivity if at_threshold else None,
            "mel_specificity": at_threshold.specificity if at_threshold else None,
        }
        intervals |= {key: m for key, m in melanoma_metrics(mel, threshold).items() if defined[key] is not None}
    row.ci95 = {
        key: metrics.bootstrap_ci(probs, targets, metric, n_boot=cfg.bootstrap, seed=cfg.seed, groups=lesion_ids)
        for key, metric in intervals.items()
    }
    if val_probs is not None and val_targets is not None:  # the figures to choose by: never the scored set's
        row.validation = ValidationFigures(
            accuracy=metrics.accuracy(val_probs, val_targets),
            balanced_accuracy=metrics.balanced_accuracy(val_probs, val_targets),
        )
        temperature = metrics.fit_temperature(val_probs, val_targets)
        calibrated = metrics.calibration_figures(apply_temperature(probs, temperature), targets)
        row.temperature = temperature
        row.ece_after_temperature = calibrated["ece"]
        row.log_loss_after_temperature = calibrated["log_loss"]
        row.classwise_ece_after_temperature = calibrated["classwise_ece"]
        row.brier_after_temperature = calibrated["brier"]
    if display is not None:
        row.display = display
        shown = apply_scaling(probs, display.scale, display.bias)
        row.displayed = CalibrationFigures.model_validate(metrics.calibration_figures(shown, targets))
    return row


def score_rows(
    eval_set: EvalSet,
    probs: Mapping[str, np.ndarray],
    targets: np.ndarray,
    class_names: list[str],
    cfg: DictConfig,
    val_probs: Mapping[str, np.ndarray],
    val_targets: np.ndarray | None,
    display: Mapping[str, DisplayCalibration],
) -> dict[str, ScoresRow]:
    """Every row of one set (members, ensemble, post-hoc rows), each with what validation chose for it."""
    return {
        name: score(
            model_probs,
            targets,
            class_names,
            cfg,
            val_probs.get(name),
            val_targets,
            eval_set.lesion_ids,
            display.get(name),
        )
        for name, model_probs in probs.items()
    }


def ensemble_weights(
    cfg: DictConfig, val_probs: dict[str, np.ndarray], val_targets: np.ndarray | None, names: list[str]
) -> tuple[list[str], list[float]]:
    """The ensemble's members and their weights (aligned, summing to 1), chosen on validation.

    ``mean``: every member, equal weights. ``greedy``: forward selection on validation, equal weights (what the
    selection scored). ``fit``: every member, weights minimising validation log loss; members fitted to weight 0
    are left out. Greedy members are not re-weighted: over all members ``fit`` already finds the best log loss, and
    re-weighting a subset chosen for another metric would no longer be the ensemble that was selected.
    """
    if cfg.ensemble == "mean":
        return names, [1.0 / len(names)] * len(names)
    if val_targets is None:
        raise CheckpointError(
            f"ensemble={cfg.ensemble} is chosen on a validation split that every member shares and none trained "
            "on, which needs checkpoints from train.py runs of one split; use ensemble=mean."
        )
    if cfg.ensemble == "greedy":
        candidates = {name: val_probs[name] for name in names}
        chosen = metrics.greedy_selection(candidates, val_targets, metric=cfg.greedy_metric)
        return chosen, [1.0 / len(chosen)] * len(chosen)
    if cfg.ensemble == "fit":
        fitted = metrics.fit_ensemble_weights([val_probs[name] for name in names], val_targets)
        kept = [(name, float(weight)) for name, weight in zip(names, fitted, strict=True) if weight > 0]
        return [name for name, _ in kept], [weight for _, weight in kept]
    raise ValueError(f"Unknown ensemble '{cfg.ensemble}'; use one of {', '.join(ENSEMBLE_MODES)}.")


def training_prior(member: Member, class_names: list[str], data_root: str | None) -> list[float]:
    """The class frequencies the member was trained on: stored in the checkpoint, else counted in its run's split."""
    stored = member.model.hparams.get("class_prior")
    if stored:
        return list(stored)
    if member.run is None:
        raise CheckpointError(
            f"{member.path} stores no class prior and is not in a train.py run folder: post-hoc logit adjustment "
            "needs the training class frequencies. Retrain it, or leave posthoc_logit_adjustment=false."
        )
    counts = member.run.split_table("train", data_root)["dx"].value_counts()
    total = sum(int(counts.get(c, 0)) for c in class_names)
    return [int(counts.get(c, 0)) / total for c in class_names]


def fit_posthoc_adjustments(
    cfg: DictConfig,
    members: Sequence[Member],
    class_names: list[str],
    val_member_probs: dict[str, np.ndarray],
    val_targets: np.ndarray | None,
    ensemble: EnsembleRecord | None = None,
) -> dict[str, FittedAdjustment]:
    """What the rows ``<member>+posthoc-la`` (and ``ensemble+posthoc-la``) apply: per row, the training prior and the
    tau with the best validation balanced accuracy, and the row it adjusts (``of``); what the app serves with
    ``logit_adjustment=true``. :func:`chosen_rows` makes the rows."""
    if val_targets is None:
        raise CheckpointError(
            "posthoc_logit_adjustment=true fits tau on the validation split, which needs "
            "checkpoints from a train.py run folder."
        )
    priors = {member.name: training_prior(member, class_names, cfg.data.root) for member in members}
    if ensemble is not None:
        ensemble_priors = np.array([priors[name] for name in ensemble.members])
        if np.allclose(ensemble_priors, ensemble_priors[0], atol=1e-6):  # one split: one training prior
            priors[ENSEMBLE] = list(ensemble_priors[0])
        else:
            log.warning("No post-hoc adjusted ensemble row: the members were trained on different class frequencies.")
    val_rows = chosen_rows(val_member_probs, ensemble, {})
    fitted: dict[str, FittedAdjustment] = {}
    for name, prior in priors.items():
        tau = metrics.fit_logit_adjustment(val_rows[name], val_targets, prior)
        fitted[name + POSTHOC_LA] = FittedAdjustment(tau=tau, prior=prior, of=name)
        log.info("Post-hoc logit adjustment of %s: tau=%.1f (validation balanced accuracy)", name, tau)
    return fitted


def trained_offset(member: Member) -> np.ndarray | None:
    """tau * log prior of a checkpoint trained with logit-adjusted cross-entropy (``model.logit_adjust_tau``): its
    softmax is a balanced-class posterior, which adding this back turns into one of the training mix; None if plain."""
    tau = float(member.model.hparams.get("logit_adjust_tau") or 0.0)
    prior = member.model.hparams.get("class_prior")
    return tau * np.log(np.asarray(prior, dtype=np.float64)) if tau and prior else None


def display_offsets(
    members: Sequence[Member], ensemble: EnsembleRecord | None, adjusted: Mapping[str, FittedAdjustment]
) -> dict[str, np.ndarray | None]:
    """Per row, the logit adjustment its probabilities carry (tau * log prior, per class), which the shown
    probabilities may add back (``prior-undo+temperature``): a trained one (logit-adjusted loss), a post-hoc one
    (``+posthoc-la`` rows), or both; None where there is none, or where ensemble members carry different ones."""
    offsets = {member.name: trained_offset(member) for member in members}
    if ensemble is not None:
        found = [offsets[name] for name in ensemble.members]
        known = [offset for offset in found if offset is not None]
        offsets[ENSEMBLE] = None
        if len(known) == len(found) and all(np.allclose(offset, known[0]) for offset in known):
            offsets[ENSEMBLE] = known[0]
        elif known:
            log.warning("The ensemble's members were trained with different logit adjustments: none is undone.")
    for row, fitted in adjusted.items():
        posthoc = fitted.tau * np.log(np.asarray(fitted.prior, dtype=np.float64))
        trained = offsets.get(fitted.of)
        offsets[row] = posthoc if trained is None else posthoc + trained
    return offsets


def fit_display_calibrations(
    cfg: DictConfig,
    members: Sequence[Member],
    val_probs: Mapping[str, np.ndarray],
    val_targets: np.ndarray,
    val_lesions: np.ndarray | None,
    ensemble: EnsembleRecord | None,
    adjusted: Mapping[str, FittedAdjustment],
) -> dict[str, DisplayCalibration]:
    """Per row, how the app shows its probabilities: chosen and fitted on the validation split
    (:func:`~lesionnet.evaluation.metrics.fit_display_calibration`, folds keeping a lesion's images together).
    Decisions keep the row's own probabilities: a logit-adjusted row decides for balanced accuracy and shows
    probabilities calibrated to the class mix."""
    offsets = display_offsets(members, ensemble, adjusted)
    fitted = {}
    for name, probs in val_probs.items():
        fitted[name] = metrics.fit_display_calibration(
            probs, val_targets, offsets.get(name), groups=val_lesions, seed=cfg.seed
        )
        log.info(
            "Shown probabilities of %s: %s (cross-validated validation log loss %s)",
            name,
            fitted[name].method,
            {key: round(value, 4) for key, value in fitted[name].validation_log_loss.items()} or "not drawn",
        )
    return fitted


def chosen_rows(
    member_probs: Mapping[str, np.ndarray], ensemble: EnsembleRecord | None, adjusted: Mapping[str, FittedAdjustment]
) -> dict[str, np.ndarray]:
    """A set's rows from its members' probabilities, with what validation chose: each member, the ensemble (its
    members and weights) and each post-hoc row (its prior and tau). Every combined row is
    :func:`~lesionnet.inference.decision.combine.combine` of its members, as the app's Predictor computes it; nothing
    is fitted here."""
    rows = dict(member_probs)
    if ensemble is not None:
        rows[ENSEMBLE] = combine([member_probs[name] for name in ensemble.members], ensemble.weights)
    for row, fitted in adjusted.items():
        if fitted.of == ENSEMBLE and ensemble is not None:
            rows[row] = combine([member_probs[name] for name in ensemble.members], ensemble.weights, fitted)
        else:
            rows[row] = combine([member_probs[fitted.of]], None, fitted)
    return rows


def classes_present(targets: np.ndarray, class_names: Sequence[str]) -> list[str]:
    """The classes a set's labels have: balanced accuracy is the mean recall over these (Derm7pt has no akiec)."""
    return [name for k, name in enumerate(class_names) if (targets == k).any()]


def score_external(
    eval_set: EvalSet,
    probs: dict[str, np.ndarray],
    class_names: list[str],
    cfg: DictConfig,
    val_probs: dict[str, np.ndarray],
    val_targets: np.ndarray | None,
    out: Path,
    overlap: dict[str, dict[str, int]],
    display: Mapping[str, DisplayCalibration] | None = None,
) -> ExternalSetScores:
    """One external set's predictions (``external/<name>/``, ISIC 2018 format) and scores, every row with the
    thresholds and temperature chosen on validation; the intervals resample lesions where the labels give every
    image a ``lesion_id``, images otherwise."""
    folder = out / EXTERNAL_DIR / eval_set.title
    folder.mkdir(parents=True, exist_ok=True)
    image_ids = eval_set.table["image_id"]
    for name, model_probs in probs.items():
        write_isic_predictions(image_ids, model_probs, class_names, folder / f"predictions_{name}.csv")
    record = ExternalSetScores(
        name=eval_set.title,
        evaluated=eval_set.description,
        n_images=len(eval_set.table),
        predictions=folder.relative_to(out).as_posix(),
        training_overlap=overlap,
    )
    if eval_set.labelled:
        write_isic_ground_truth(image_ids, eval_set.table["dx"], folder / "ground_truth_isic.csv")
        targets = eval_set.targets(class_names)
        record.classes_present = classes_present(targets, class_names)
        record.bootstrap = bootstrap_unit(eval_set, cfg.bootstrap)
        record.scores = score_rows(eval_set, probs, targets, class_names, cfg, val_probs, val_targets, display or {})
    return record


def seen_lesion_breakdown(
    members: Sequence[Member], eval_set: EvalSet, probs: dict[str, np.ndarray], targets: np.ndarray
) -> dict[str, dict[str, GroupFigures]]:
    """Accuracy on scored images whose lesion has training images in the model (possible only on the seed's
    image-level legacy split) vs on the rest: how much seeing a lesion's sibling images inflates the figures."""
    lesions = eval_set.lesion_ids
    if lesions is None:
        return {}
    out = {}
    for member in members:
        if member.provenance is None:
            continue
        trained = {
            lesion
            for lesion, split in zip(member.provenance.lesion_id, member.provenance.split, strict=True)
            if split == "train"
        }
        seen = np.isin(lesions, list(trained))
        if not seen.any():
            continue
        model_probs = probs[member.name]
        out[member.name] = {
            group: GroupFigures(
                n_images=int(mask.sum()),
                accuracy=metrics.accuracy(model_probs[mask], targets[mask]),
                balanced_accuracy=metrics.balanced_accuracy(model_probs[mask], targets[mask]),
            )
            for group, mask in (("lesion_seen_in_training", seen), ("lesion_not_seen", ~seen))
            if mask.any()
        }
    return out


def write_plots(
    out: Path,
    probs: np.ndarray,
    targets: np.ndarray,
    class_names: list[str],
    temperature: float | None,
    display: DisplayCalibration | None = None,
) -> dict[str, str]:
    """Confusion matrices, ROC curves and the reliability diagram of the final row; the diagram's calibrated curve is
    what the app shows (the display calibration, else the temperature)."""
    if display is not None:
        calibrated: np.ndarray | None = apply_scaling(probs, display.scale, display.bias)
    else:
        calibrated = apply_temperature(probs, temperature) if temperature is not None else None
    cm = np.asarray(metrics.classification_scores(probs, targets, class_names)["confusion_matrix"])
    files = {
        "confusion_counts": plots.plot_confusion_matrix(cm, class_names, out / "confusion_counts.png", normalize=False),
        "confusion_normalised": plots.plot_confusion_matrix(
            cm, class_names, out / "confusion_normalised.png", normalize=True
        ),
        "roc": plots.plot_roc_curves(probs, targets, class_names, out / "roc.png"),
        "reliability": plots.plot_reliability_diagram(
            probs,
            targets,
            out / "reliability.png",
            calibrated=calibrated,
        ),
    }
    return {k: Path(v).name for k, v in files.items()}


def evaluate(cfg: DictConfig) -> ScoresFile:
    """Score checkpoints (and their ensemble) and write predictions, scores.json, plots and report.md."""
    check_config(cfg)
    specs = external_specs(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    members = load_members(cfg.ckpt, device=cfg.device)
    predictor = Predictor(members, tta=cfg.tta)
    class_names = predictor.class_names
    target, val = build_sets(cfg, members, class_names)
    provenance, overlap, duplicates = check_provenance(
        members,
        target.table,
        target.description,
        val.table if val is not None else None,
        val.description if val is not None else None,
        allow_unknown=cfg.allow_unknown_provenance,
        in_sample=target.title == SPLIT_TITLES["val"],
        run_split=not cfg.data.images,
    )
    for eval_set, dropped in ((target, duplicates["target"]), (val, duplicates["selection"])):
        if eval_set is not None and dropped:
            log.warning(
                "Leaving out of the %s %d image(s) that are the same file or picture as a training image "
                "under another image id (dataset duplicates): %s",
                eval_set.description,
                len(dropped),
                dropped,
            )
            eval_set.table = eval_set.table[~eval_set.table["image_id"].isin(dropped)].reset_index(drop=True)
    externals: list[tuple[EvalSet, dict[str, dict[str, int]]]] = []
    for spec in specs:  # each checked against what the models learnt from, before anything is predicted
        external = EvalSet(external_table(spec.images, spec.labels, class_names), spec.description, spec.name)
        if external.table.empty:
            raise CheckpointError(f"Nothing to evaluate: the {external.description} has no labelled image.")
        _, external_overlap, _ = check_provenance(
            members,
            external.table,
            external.description,
            None,
            None,
            allow_unknown=cfg.allow_unknown_provenance,
            run_split=False,
        )
        externals.append((external, external_overlap))
    names = [m.name for m in members]
    log.info("Evaluating %s on the %s (%d images)", names, target.description, len(target.table))

    def predict(table: pd.DataFrame, what: str) -> dict[str, np.ndarray]:
        prediction = predictor.predict_paths(
            table["path"].tolist(), batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, desc=what
        )
        return dict(zip(names, prediction.member_probs, strict=True))

    member_probs = predict(target.table, "eval")
    val_member_probs = predict(val.table, "val") if val is not None else {}
    val_targets = val.targets(class_names) if val is not None else None
    ensemble = None
    if len(members) > 1 and cfg.ensemble != "none":
        chosen, weights = ensemble_weights(cfg, val_member_probs, val_targets, names)
        ensemble = EnsembleRecord(mode=cfg.ensemble, members=chosen, weights=weights)
    adjusted: dict[str, FittedAdjustment] = {}
    if cfg.posthoc_logit_adjustment:
        adjusted = fit_posthoc_adjustments(cfg, members, class_names, val_member_probs, val_targets, ensemble)
    probs = chosen_rows(member_probs, ensemble, adjusted)
    val_probs = chosen_rows(val_member_probs, ensemble, adjusted) if val is not None else {}
    display: dict[str, DisplayCalibration] = {}
    if val is not None and val_targets is not None:
        display = fit_display_calibrations(cfg, members, val_probs, val_targets, val.lesion_ids, ensemble, adjusted)

    for name, model_probs in probs.items():
        write_isic_predictions(target.table["image_id"], model_probs, class_names, out / f"predictions_{name}.csv")
    result = ScoresFile(
        evaluated=target.description,
        set=target.title,
        in_sample=target.title == SPLIT_TITLES["val"],
        n_images=len(target.table),
        tta=cfg.tta,
        ensemble=ensemble,
        training_overlap=overlap,
        excluded_duplicates=duplicates,
        models=[ScoredModel(**m.describe(), provenance=provenance[m.name]) for m in members],
        validation=val.description if val is not None else None,
    )
    if target.labelled:
        write_isic_ground_truth(target.table["image_id"], target.table["dx"], out / "ground_truth_isic.csv")
        targets = target.targets(class_names)
        result.bootstrap = bootstrap_unit(target, cfg.bootstrap)
        result.classes_present = classes_present(targets, class_names)
        result.scores = score_rows(target, probs, targets, class_names, cfg, val_probs, val_targets, display)
        for row, fitted in adjusted.items():
            result.scores[row].logit_adjustment = fitted
        for name, breakdown in seen_lesion_breakdown(members, target, probs, targets).items():
            result.scores[name].seen_lesions = breakdown
        result.final = ENSEMBLE if ENSEMBLE in probs else names[0]
        final = result.scores[result.final]
        result.plots = write_plots(out, probs[result.final], targets, class_names, final.temperature, final.display)
    for external, external_overlap in externals:
        log.info("Evaluating %s on the %s (%d images)", names, external.description, len(external.table))
        external_probs = chosen_rows(predict(external.table, external.title), ensemble, adjusted)
        result.external.append(
            score_external(
                external, external_probs, class_names, cfg, val_probs, val_targets, out, external_overlap, display
            )
        )
    write_scores(result, out / "scores.json")
    if target.labelled:
        write_eval_report(result, class_names, out / "report.md")
    log.info("Written to %s", out)
    return result
