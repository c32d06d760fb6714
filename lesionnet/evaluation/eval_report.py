"""The Markdown report of an evaluation: one table of every model and the ensemble, one table of every set side by
side (the evaluated set, then each external set), then the final model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lesionnet.contract.scores import BootstrapRecord, EnsembleRecord, ScoresFile, ScoresRow


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _value_ci(value: float | None, ci: tuple[float | None, float | None] | None) -> str:
    """``0.812 [0.790, 0.833]``; the value alone where no interval was drawn, "–" where undefined."""
    if value is None:
        return _fmt(None)
    if ci is None or ci[0] is None or ci[1] is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _pair(sensitivity: float | None, specificity: float | None) -> str:
    return f"{_fmt(sensitivity)} / {_fmt(specificity)}"


def summary_table(result: ScoresFile) -> pd.DataFrame:
    """One row per model: the headline metrics a reader compares across models."""
    rows = []
    for name, row in (result.scores or {}).items():
        argmax = row.melanoma.argmax if row.melanoma else None
        at_thr = row.at_val_threshold
        rows.append(
            {
                "model": name,
                "val balanced acc": _fmt(row.validation.balanced_accuracy if row.validation else None),
                "accuracy [95% CI]": _value_ci(row.accuracy, row.ci95.get("accuracy")),
                "balanced acc [95% CI]": _value_ci(row.balanced_accuracy, row.ci95.get("balanced_accuracy")),
                "macro F1": _fmt(row.macro_f1),
                "macro AUROC": _fmt(row.macro_auroc),
                "mel sens / spec (argmax)": _pair(argmax.sensitivity, argmax.specificity)
                if argmax
                else _pair(None, None),
                "mel sens / spec (val threshold)": _pair(at_thr.sensitivity, at_thr.specificity)
                if at_thr
                else _pair(None, None),
                "log loss": _fmt(row.log_loss),
                "ECE": _fmt(row.ece),
                "class-wise ECE": _fmt(row.classwise_ece),
                "Brier": _fmt(row.brier),
                "ECE after T": _fmt(row.ece_after_temperature),
            }
        )
    return pd.DataFrame(rows)


CALIBRATION_FIGURES: tuple[tuple[str, str], ...] = (
    ("ECE", "ece"),
    ("class-wise ECE", "classwise_ece"),
    ("log loss", "log_loss"),
    ("Brier", "brier"),
)


def calibration_table(result: ScoresFile) -> pd.DataFrame:
    """One row per model: top-label and class-wise ECE, log loss and Brier score of its probabilities, after the
    temperature alone, and as the app shows them (the display calibration chosen on validation)."""
    rows = []
    for name, row in (result.scores or {}).items():
        stages = {
            "": {key: getattr(row, key) for _, key in CALIBRATION_FIGURES},
            "after T: ": {
                "ece": row.ece_after_temperature,
                "classwise_ece": row.classwise_ece_after_temperature,
                "log_loss": row.log_loss_after_temperature,
                "brier": row.brier_after_temperature,
            },
            "shown: ": row.displayed.model_dump() if row.displayed else {},
        }
        line = {"model": name, "shown as": row.display.method if row.display else "–"}
        for prefix, figures in stages.items():
            line |= {f"{prefix}{label}": _fmt(figures.get(key)) for label, key in CALIBRATION_FIGURES}
        rows.append(line)
    return pd.DataFrame(rows)


def calibration_section(result: ScoresFile) -> list[str]:
    """How calibrated each row's probabilities are, top-label and per class, before and after what the app applies."""
    return [
        "## Calibration",
        "",
        "Top-label ECE looks only at each image's largest probability; class-wise ECE (every class's probability "
        "against that class's frequency, averaged over the classes), log loss and Brier score see every class. Each "
        "row's probabilities are as scored (decisions, thresholds), after the validation temperature alone, and as the "
        'app shows them ("shown as": the family with the lowest cross-validated log loss on the validation split; '
        "prior-undo+temperature adds a logit adjustment back before the temperature, so a logit-adjusted row decides "
        "for balanced accuracy but shows probabilities of the class mix).",
        "",
        calibration_table(result).to_markdown(index=False),
        "",
    ]


@dataclass(frozen=True)
class ScoredSet:
    """One column group of the report: the evaluated set or an external one, with its rows."""

    name: str
    n_images: int
    bootstrap: BootstrapRecord | None
    classes_present: list[str] | None
    scores: dict[str, ScoresRow]
    evaluated: str | None = None  # external sets: where the images come from
    predictions: str | None = None  # external sets: the folder of their predictions


def scored_sets(result: ScoresFile) -> list[ScoredSet]:
    """Every labelled set of the run, the evaluated one first."""
    sets = [ScoredSet(result.set, result.n_images, result.bootstrap, result.classes_present, result.scores or {})]
    return sets + [
        ScoredSet(e.name, e.n_images, e.bootstrap, e.classes_present, e.scores, e.evaluated, e.predictions)
        for e in result.external
        if e.scores
    ]


def _present(scored: ScoredSet, class_names: list[str]) -> list[str]:
    """The classes a set's labels have (files without ``classes_present``: those with support in the rows)."""
    if scored.classes_present is not None:
        return list(scored.classes_present)
    per_class = next(iter(scored.scores.values())).per_class
    return [c for c in class_names if c in per_class and per_class[c].support]


def set_line(scored: ScoredSet, class_names: list[str]) -> str:
    """What one column group was scored on: its size, what its intervals resample, which classes it has."""
    present = _present(scored, class_names)
    absent = [c for c in class_names if c not in present]
    classes = (
        f"all {len(class_names)} classes"
        if not absent
        else f"{len(present)} of the {len(class_names)} classes, **no {', '.join(absent)}**: balanced accuracy is "
        f"the mean recall over the {len(present)} it has (a prediction of {', '.join(absent)} counts as a miss)"
    )
    bootstrap = scored.bootstrap
    source = f", {scored.evaluated}; predictions in {scored.predictions}/" if scored.predictions else ""
    intervals = f"{bootstrap.description}, {bootstrap.resamples} resamples" if bootstrap else "none"
    return f"- **{scored.name}**: {scored.n_images:,} images{source}; {classes}; 95% intervals: {intervals}."


def _set_columns(row: ScoresRow | None) -> dict[str, str]:
    """One row's column group in one set ("–" where the set has no such row or the figure is undefined)."""
    if row is None:
        return dict.fromkeys(("accuracy", "balanced acc", "mel AUROC", "mel sens", "mel spec"), _fmt(None))
    at_thr = row.at_val_threshold
    return {
        "accuracy": _value_ci(row.accuracy, row.ci95.get("accuracy")),
        "balanced acc": _value_ci(row.balanced_accuracy, row.ci95.get("balanced_accuracy")),
        "mel AUROC": _value_ci(row.melanoma.auroc if row.melanoma else None, row.ci95.get("mel_auroc")),
        "mel sens": _value_ci(at_thr.sensitivity if at_thr else None, row.ci95.get("mel_sensitivity")),
        "mel spec": _value_ci(at_thr.specificity if at_thr else None, row.ci95.get("mel_specificity")),
    }


def sets_table(result: ScoresFile) -> pd.DataFrame:
    """One row per model, one column group per set: accuracy, balanced accuracy, melanoma AUROC and melanoma
    sensitivity/specificity at the referral threshold chosen on validation (one threshold per row, for every set)."""
    sets = scored_sets(result)
    rows = []
    for name, main in (result.scores or {}).items():
        main_thr = main.at_val_threshold
        line: dict[str, str] = {"model": name, "mel threshold (val)": _fmt(main_thr.threshold if main_thr else None)}
        for scored in sets:
            line |= {f"{scored.name}: {column}": text for column, text in _set_columns(scored.scores.get(name)).items()}
        rows.append(line)
    return pd.DataFrame(rows)


def sets_section(result: ScoresFile, class_names: list[str]) -> list[str]:
    """The side-by-side table of every set, with what each set is and how its intervals were drawn."""
    external = result.external
    final = result.final_scores
    target = final.at_val_threshold if final else None
    lines = [
        "## Every set" if not external else "## Generalisation: every set",
        "",
        "Per set: accuracy, balanced accuracy (mean recall over the classes the set has), melanoma AUROC, and "
        "melanoma sensitivity / specificity when referring at P(mel) >= the row's threshold, chosen on validation"
        + (
            f" for sensitivity >= {target.target_sensitivity} and applied unchanged to every set"
            if target is not None
            else " (none here: no validation split with melanomas)"
        )
        + ". Nothing is fitted on the scored sets.",
        "",
        *(set_line(scored, class_names) for scored in scored_sets(result)),
    ]
    lines += [
        f"- **{e.name}**: {e.n_images:,} images, {e.evaluated}: predictions only, in {e.predictions}/."
        for e in external
        if not e.scores
    ]
    return [*lines, "", sets_table(result).to_markdown(index=False), ""]


def per_class_table(row: ScoresRow) -> pd.DataFrame:
    table = {name: figures.model_dump() for name, figures in row.per_class.items()}
    return pd.DataFrame(table).T.rename_axis("class").reset_index()


def ensemble_line(ensemble: EnsembleRecord) -> str:
    """Members with the weights the ensemble averages them by (what the app must serve to match these scores)."""
    members = ", ".join(
        f"{name} ({weight:.3f})" for name, weight in zip(ensemble.members, ensemble.weights, strict=True)
    )
    return f"Ensemble ({ensemble.mode}) of: {members}."


def write_eval_report(result: ScoresFile, class_names: list[str], path: Path) -> Path:
    """report.md, titled by the set that was evaluated, so in-sample validation figures never read as test ones."""
    final, scores = result.final, result.final_scores
    if final is None or scores is None:
        raise ValueError(f"No report for an unlabelled set ({result.evaluated}): there is nothing scored to report.")
    mel_thr = scores.at_val_threshold
    title = result.set
    lines = [
        f"# LesionNet evaluation: {title}",
        "",
        f"Evaluated on the {result.evaluated} ({result.n_images} images); TTA: {result.tta}.",
        f"Selection, ensemble weights, melanoma threshold, temperature and the calibration of the shown probabilities "
        f"were fitted on the {result.validation}."
        if result.validation
        else "No validation split: no threshold or temperature fitted.",
    ]
    unknown = [model.name for model in result.models if model.provenance != "checked"]
    if unknown:
        lines.append(
            f"**Provenance unknown** for {', '.join(unknown)}: the checkpoint predates (bound) provenance records, "
            "so it cannot be shown that it never saw these images."
        )
    elif result.in_sample:  # checked against the training images only: the scored images are the validation ones
        lines.append(
            "Provenance checked against training only: no evaluated image is, by id, content or picture, one the "
            "models trained on. They are not unseen: they are the validation images the models were chosen on."
        )
    else:
        lines.append(
            "Provenance checked: no evaluated image is, by id, content or picture, one the models trained or were "
            "validated on."
        )
    if result.in_sample:
        lines.append(
            "**In-sample:** these are the validation images the checkpoints, ensemble weights, melanoma threshold "
            "and temperature were chosen on (not trained on); the figures are optimistic and are no estimate of "
            "performance on new images."
        )
    lines += [
        f"95% intervals: {result.bootstrap.description}, {result.bootstrap.resamples} resamples."
        if result.bootstrap
        else "No intervals drawn.",
        "",
        summary_table(result).to_markdown(index=False),
        "",
        *calibration_section(result),
        *sets_section(result, class_names),
        f"## {final}",
        "",
    ]
    if result.ensemble:
        lines += [ensemble_line(result.ensemble), ""]
    if mel_thr and mel_thr.threshold is not None and mel_thr.sensitivity is not None:  # None: no melanoma scored
        lines += [
            f"Melanoma referral threshold {mel_thr.threshold:.3f} (chosen on validation for sensitivity "
            f">= {mel_thr.target_sensitivity}): {title} sensitivity {mel_thr.sensitivity:.3f}, "
            f"specificity {_fmt(mel_thr.specificity)}.",
            "",
        ]
    lines += [per_class_table(scores).to_markdown(index=False, floatfmt=".3f"), ""]
    for key, file in (result.plots or {}).items():
        lines += [f"![{key}]({file})", ""]
    path.write_text("\n".join(lines))
    return path
