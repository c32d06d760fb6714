"""The Markdown report of an evaluation: one table of every model and the ensemble, then the final model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _with_ci(scores: dict[str, Any], key: str) -> str:
    low, high = scores["ci95"][key]
    return f"{scores[key]:.3f} [{low:.3f}, {high:.3f}]"


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


def per_class_table(scores: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(scores["per_class"]).T.rename_axis("class").reset_index()


def ensemble_line(ensemble: dict[str, Any]) -> str:
    """Members with the weights the ensemble averages them by (what the app must serve to match these scores)."""
    members = ", ".join(
        f"{name} ({weight:.3f})" for name, weight in zip(ensemble["members"], ensemble["weights"], strict=True)
    )
    return f"Ensemble ({ensemble['mode']}) of: {members}."


def write_report(result: dict[str, Any], class_names: list[str], path: Path) -> Path:
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
