"""The Markdown report of an evaluation: one table of every model and the ensemble, one table of every set side by
side (the evaluated set, then each external set), then the final model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _with_ci(scores: dict[str, Any], key: str) -> str:
    low, high = scores["ci95"][key]
    return f"{scores[key]:.3f} [{low:.3f}, {high:.3f}]"


def _value_ci(value: float | None, ci: list[float] | None) -> str:
    """``0.812 [0.790, 0.833]``; the value alone where no interval was drawn, "–" where undefined."""
    if value is None:
        return _fmt(None)
    return f"{value:.3f}" if not ci else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def summary_table(result: dict[str, Any]) -> pd.DataFrame:
    """One row per model: the headline metrics a reader compares across models."""
    rows = []
    for name, s in result["scores"].items():
        mel = s.get("melanoma", {})
        at_thr = mel.get("val_threshold", {})
        rows.append(
            {
                "model": name,
                "val balanced acc": _fmt(s.get("validation", {}).get("balanced_accuracy")),
                "accuracy [95% CI]": _with_ci(s, "accuracy"),
                "balanced acc [95% CI]": _with_ci(s, "balanced_accuracy"),
                "macro F1": _fmt(s["macro_f1"]),
                "macro AUROC": _fmt(s["macro_auroc"]),
                "mel sens / spec (argmax)": f"{_fmt(mel.get('argmax', {}).get('sensitivity'))} / "
                f"{_fmt(mel.get('argmax', {}).get('specificity'))}",
                "mel sens / spec (val threshold)": (
                    f"{_fmt(at_thr.get('sensitivity'))} / {_fmt(at_thr.get('specificity'))}"
                ),
                "log loss": _fmt(s["log_loss"]),
                "ECE": _fmt(s["ece"]),
                "ECE after T": _fmt(s.get("ece_after_temperature")),
            }
        )
    return pd.DataFrame(rows)


def scored_sets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every labelled set of the run, the evaluated one first: {name, n_images, bootstrap, classes_present, scores}."""
    first = {key: result.get(key) for key in ("n_images", "bootstrap", "classes_present", "scores")}
    sets = [{"name": result["set"], **first}]
    return sets + [e for e in result.get("external") or [] if e.get("scores")]


def _present(scored: dict[str, Any], class_names: list[str]) -> list[str]:
    """The classes a set's labels have (files without ``classes_present``: those with support in the rows)."""
    if scored.get("classes_present") is not None:
        return list(scored["classes_present"])
    per_class = next(iter(scored["scores"].values()))["per_class"]
    return [c for c in class_names if (per_class.get(c) or {}).get("support")]


def set_line(scored: dict[str, Any], class_names: list[str]) -> str:
    """What one column group was scored on: its size, what its intervals resample, which classes it has."""
    present = _present(scored, class_names)
    absent = [c for c in class_names if c not in present]
    classes = (
        f"all {len(class_names)} classes"
        if not absent
        else f"{len(present)} of the {len(class_names)} classes, **no {', '.join(absent)}**: balanced accuracy is "
        f"the mean recall over the {len(present)} it has (a prediction of {', '.join(absent)} counts as a miss)"
    )
    bootstrap = scored.get("bootstrap") or {}
    source = f", {scored['evaluated']}; predictions in {scored['predictions']}/" if scored.get("predictions") else ""
    return (
        f"- **{scored['name']}**: {scored['n_images']:,} images{source}; {classes}; 95% intervals: "
        f"{bootstrap.get('description', 'none')}, {bootstrap.get('resamples', 0)} resamples."
    )


def sets_table(result: dict[str, Any]) -> pd.DataFrame:
    """One row per model, one column group per set: accuracy, balanced accuracy, melanoma AUROC and melanoma
    sensitivity/specificity at the referral threshold chosen on validation (one threshold per row, for every set)."""
    sets = scored_sets(result)
    rows = []
    for name, main in result["scores"].items():
        threshold = (main.get("melanoma") or {}).get("val_threshold", {}).get("threshold")
        row: dict[str, str] = {"model": name, "mel threshold (val)": _fmt(threshold)}
        for scored in sets:
            s = scored["scores"].get(name, {})
            ci = s.get("ci95", {})
            mel = s.get("melanoma") or {}
            at_thr = mel.get("val_threshold") or {}
            group = scored["name"]
            row |= {
                f"{group}: accuracy": _value_ci(s.get("accuracy"), ci.get("accuracy")),
                f"{group}: balanced acc": _value_ci(s.get("balanced_accuracy"), ci.get("balanced_accuracy")),
                f"{group}: mel AUROC": _value_ci(mel.get("auroc"), ci.get("mel_auroc")),
                f"{group}: mel sens": _value_ci(at_thr.get("sensitivity"), ci.get("mel_sensitivity")),
                f"{group}: mel spec": _value_ci(at_thr.get("specificity"), ci.get("mel_specificity")),
            }
        rows.append(row)
    return pd.DataFrame(rows)


def sets_section(result: dict[str, Any], class_names: list[str]) -> list[str]:
    """The side-by-side table of every set, with what each set is and how its intervals were drawn."""
    external = result.get("external") or []
    target = (result["scores"][result["final"]].get("melanoma") or {}).get("val_threshold", {})
    lines = [
        "## Every set" if not external else "## Generalisation: every set",
        "",
        "Per set: accuracy, balanced accuracy (mean recall over the classes the set has), melanoma AUROC, and "
        "melanoma sensitivity / specificity when referring at P(mel) >= the row's threshold, chosen on validation"
        + (
            f" for sensitivity >= {target['target_sensitivity']} and applied unchanged to every set"
            if target.get("target_sensitivity")
            else " (none here: no validation split with melanomas)"
        )
        + ". Nothing is fitted on the scored sets.",
        "",
        *(set_line(scored, class_names) for scored in scored_sets(result)),
    ]
    lines += [
        f"- **{e['name']}**: {e['n_images']:,} images, {e['evaluated']}: predictions only, in {e['predictions']}/."
        for e in external
        if not e.get("scores")
    ]
    return [*lines, "", sets_table(result).to_markdown(index=False), ""]


def per_class_table(scores: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(scores["per_class"]).T.rename_axis("class").reset_index()


def ensemble_line(ensemble: dict[str, Any]) -> str:
    """Members with the weights the ensemble averages them by (what the app must serve to match these scores)."""
    members = ", ".join(
        f"{name} ({weight:.3f})" for name, weight in zip(ensemble["members"], ensemble["weights"], strict=True)
    )
    return f"Ensemble ({ensemble['mode']}) of: {members}."


def write_eval_report(result: dict[str, Any], class_names: list[str], path: Path) -> Path:
    """report.md, titled by the set that was evaluated, so in-sample validation figures never read as test ones."""
    final = result["final"]
    scores = result["scores"][final]
    mel_thr = scores.get("melanoma", {}).get("val_threshold")
    title = result["set"]
    lines = [
        f"# LesionNet evaluation: {title}",
        "",
        f"Evaluated on the {result['evaluated']} ({result['n_images']} images); TTA: {result['tta']}.",
        f"Selection, ensemble weights, melanoma threshold and temperature were fitted on the {result['validation']}."
        if result["validation"]
        else "No validation split: no threshold or temperature fitted.",
    ]
    unknown = [model["name"] for model in result["models"] if model["provenance"] != "checked"]
    lines.append(
        f"**Provenance unknown** for {', '.join(unknown)}: the checkpoint predates provenance records, so it cannot "
        "be shown that it never saw these images."
        if unknown
        else "Provenance checked: no evaluated image is, by id, content or picture, one the models trained or were "
        "validated on."
    )
    if result["in_sample"]:
        lines.append(
            "**In-sample:** these are the images everything above was fitted on; the figures are optimistic "
            "and are no estimate of performance on new images."
        )
    lines += [
        f"95% intervals: {result['bootstrap']['description']}, {result['bootstrap']['resamples']} resamples.",
        "",
        summary_table(result).to_markdown(index=False),
        "",
        *sets_section(result, class_names),
        f"## {final}",
        "",
    ]
    if result["ensemble"]:
        lines += [ensemble_line(result["ensemble"]), ""]
    if mel_thr and mel_thr.get("sensitivity") is not None:  # None: no melanoma in the evaluated set
        lines += [
            f"Melanoma referral threshold {mel_thr['threshold']:.3f} (chosen on validation for sensitivity "
            f">= {mel_thr['target_sensitivity']}): {title} sensitivity {mel_thr['sensitivity']:.3f}, "
            f"specificity {mel_thr['specificity']:.3f}.",
            "",
        ]
    lines += [per_class_table(scores).to_markdown(index=False, floatfmt=".3f"), ""]
    for key, file in result["plots"].items():
        lines += [f"![{key}]({file})", ""]
    path.write_text("\n".join(lines))
    return path
