"""Report sections on the metadata (classes, lesions, age, sex, body site, diagnosis type) and on the split."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

from lesionnet.classes import CLASS_LONG_NAMES
from lesionnet.data.metadata import DatasetError, preview_items
from lesionnet.data.split import SPLITS, assert_no_leak
from lesionnet.eda.common import UNKNOWN, _classes, _crosstab, _md, _pct, _with_total
from lesionnet.eda.plots import _figure, _image, _save, _share_plot
from lesionnet.eda.stats import duplicate_images

DX_TYPE_MEANING: dict[str, str] = {
    "histo": "histopathology",
    "follow_up": "follow-up: unchanged at digital dermoscopy follow-up, not excised",
    "consensus": "expert consensus (typical benign cases without histology or follow-up)",
    "confocal": "in-vivo reflectance confocal microscopy",
}


def section_overview(table: pd.DataFrame, title: str, details: Mapping[str, object]) -> str:
    """Title, provenance and the image/lesion distinction every later number depends on."""
    lines = [f"# {title}", "", "Written by `lesionnet eda`.", ""]
    lines += [f"- {key}: {value}" for key, value in details.items()]
    lines += [
        f"- images: {len(table):,}; lesions (`lesion_id`): {table['lesion_id'].nunique():,}; "
        f"classes: {len(_classes(table))}",
        "",
        "Counts are images unless a table says lesions. One lesion can have several images, and its "
        "patient fields (age, sex, body site) repeat on each of them. The dataset has no patient id.",
    ]
    return "\n".join(lines)


def section_quality(table: pd.DataFrame) -> str:
    """Data-quality findings that change how numbers (or a model's use of metadata) should be read."""
    lines = ["## Data quality notes", ""]
    if "age" in table:
        age = table["age"]
        zero = int((age == 0).sum())
        lines.append(
            f"- age missing: {int(age.isna().sum()):,} images; age 0: {zero:,} images"
            + (" (kept as given; 0 may be a placeholder rather than a newborn)" if zero else "")
        )
    for column in ("sex", "localization", "dx_type"):
        if column in table:
            unknown = table[column].isna() | (table[column].astype(str) == UNKNOWN)
            lines.append(f"- {column} missing or '{UNKNOWN}': {int(unknown.sum()):,} images")
    fields = [c for c in ("age", "sex", "localization") if c in table]
    if fields:
        missing = pd.concat([table[c].isna() | (table[c].astype(str) == UNKNOWN) for c in fields], axis=1)
        lines.append(
            f"- images with all of {', '.join(fields)} missing or '{UNKNOWN}': {int(missing.all(axis=1).sum()):,}"
        )
        mixed = table.groupby("lesion_id")[fields].nunique(dropna=False) > 1
        for field in fields:
            ids = mixed.index[mixed[field]]
            if len(ids):
                lines.append(f"- lesions whose images disagree on {field}: {len(ids)} ({preview_items(ids)})")
    lines += _duplicate_lines(table)
    return "\n".join(lines)


def _duplicate_lines(table: pd.DataFrame) -> list[str]:
    groups = duplicate_images(table)
    if not groups:
        return ["- byte-identical image files: none"]
    lesion_of = table.set_index("image_id")["lesion_id"]
    across = [g for g in groups if lesion_of[g].nunique() > 1]
    lines = [
        f"- byte-identical image files: {len(groups)} group(s), {len(across)} spanning more than one lesion "
        "(those could sit on both sides of a lesion-level split)"
    ]
    lines += [f"  - {', '.join(g)} (lesion_id {', '.join(sorted(set(lesion_of[g])))})" for g in groups[:10]]
    return lines


def section_classes(table: pd.DataFrame, out_dir: Path) -> str:
    """Class balance by image and by lesion: the imbalance the loss weighting and metrics must handle."""
    classes = _classes(table)
    images = table["dx"].value_counts().reindex(classes)
    lesions = table.groupby("dx")["lesion_id"].nunique().reindex(classes)
    df = pd.DataFrame(
        {
            "diagnosis": [CLASS_LONG_NAMES.get(c, c) for c in classes],
            "images": images,
            "images %": _pct(images, images.sum()),
            "lesions": lesions,
            "lesions %": _pct(lesions, lesions.sum()),
            "images per lesion": (images / lesions).round(2),
        },
        index=pd.Index(classes, name="dx"),
    )
    total = pd.DataFrame(
        {
            "diagnosis": "",
            "images": images.sum(),
            "images %": 100.0,
            "lesions": lesions.sum(),
            "lesions %": 100.0,
            "images per lesion": round(images.sum() / lesions.sum(), 2),
        },
        index=pd.Index(["total"], name="dx"),
    )
    fig = _figure(6.4, 3.2)
    ax = fig.subplots()
    y = np.arange(len(classes))
    ax.barh(y - 0.2, images, height=0.4, label="images")
    ax.barh(y + 0.2, lesions, height=0.4, label="lesions")
    for i, (n_img, n_les) in enumerate(zip(images, lesions, strict=True)):
        ax.text(n_img, i - 0.2, f" {n_img:,}", va="center", fontsize="x-small")
        ax.text(n_les, i + 0.2, f" {n_les:,}", va="center", fontsize="x-small")
    ax.set_yticks(y, classes)
    ax.invert_yaxis()
    ax.set_xlim(0, images.max() * 1.15)
    ax.set_title("Images and lesions per class")
    ax.legend(frameon=False, loc="lower right")
    plot = _save(fig, out_dir / "class_counts.png")
    return "\n".join(
        [
            "## Classes",
            "",
            _md(pd.concat([df, total]), floatfmt=(*[".1f"] * 6, ".2f")),
            "",
            _image(plot, "images and lesions per class"),
        ]
    )


def section_images_per_lesion(table: pd.DataFrame, out_dir: Path) -> str:
    """Why the split is by lesion: many lesions have several (near-duplicate) images."""
    per_lesion = table.groupby("lesion_id").agg(dx=("dx", "first"), n=("image_id", "size"))
    counts = pd.crosstab(per_lesion["n"], per_lesion["dx"]).reindex(columns=_classes(table), fill_value=0)
    counts.columns.name = None
    df = pd.DataFrame({"lesions": counts.sum(axis=1)}).assign(images=lambda d: d["lesions"] * d.index)
    df = pd.concat([df, counts], axis=1)
    df.index.name = "images per lesion"
    fig = _figure(5.0, 2.8)
    ax = fig.subplots()
    bars = ax.bar(df.index, df["lesions"])
    ax.set_xticks(df.index)
    ax.bar_label(bars, labels=[f"{v:,}" for v in df["lesions"]], fontsize="x-small")
    ax.set_yscale("log")
    ax.set_xlabel("images per lesion")
    ax.set_ylabel("lesions (log scale)")
    ax.set_title("How many images each lesion has")
    plot = _save(fig, out_dir / "images_per_lesion.png")
    return "\n".join(
        [
            "## Images per lesion",
            "",
            "Lesions by their number of images, overall and per class (columns after `images` count lesions).",
            "",
            _md(_with_total(df)),
            "",
            _image(plot, "images per lesion"),
        ]
    )


def section_age(table: pd.DataFrame, out_dir: Path) -> str:
    """Age by class, with missing and zero ages counted rather than silently dropped."""
    if "age" not in table:
        return "## Age\n\nNo `age` column in the metadata."
    classes = _classes(table)
    groups = table.groupby("dx")["age"]
    df = pd.DataFrame(
        {
            "images": groups.size(),
            "age known": groups.count(),
            "age missing": groups.apply(lambda a: a.isna().sum()),
            "age 0": groups.apply(lambda a: (a == 0).sum()),
            "mean": groups.mean(),
            "median": groups.median(),
            "q1": groups.quantile(0.25),
            "q3": groups.quantile(0.75),
            "min": groups.min(),
            "max": groups.max(),
        }
    ).reindex(classes)
    known = [table.loc[(table["dx"] == c) & table["age"].notna(), "age"].to_numpy() for c in classes]
    fig = _figure(6.4, 3.2)
    ax_box, ax_hist = fig.subplots(1, 2, width_ratios=[3, 2])
    ax_box.boxplot(known, orientation="horizontal", tick_labels=classes, flierprops={"markersize": 2})
    ax_box.invert_yaxis()
    ax_box.set_xlabel("age (years)")
    ax_box.set_title("Age by class")
    ax_hist.hist(table["age"].dropna(), bins=np.arange(0, 95, 5))
    ax_hist.set_xlabel("age (years)")
    ax_hist.set_ylabel("images")
    ax_hist.set_title("All images")
    plot = _save(fig, out_dir / "age.png")
    return "\n".join(["## Age", "", _md(df), "", _image(plot, "age by class")])


def section_categorical(table: pd.DataFrame, out_dir: Path, column: str, heading: str, note: str = "") -> str:
    """Class x value cross-tab with totals and a 100 % bar plot (sex, diagnosis type)."""
    if column not in table:
        return f"## {heading}\n\nNo `{column}` column in the metadata."
    counts = _crosstab(table, column)
    plot = _share_plot(counts, out_dir / f"{column}.png", f"{heading} by class")
    lines = [f"## {heading}", ""] + ([note, ""] if note else [])
    shown = _with_total(counts.assign(total=counts.sum(axis=1)))
    return "\n".join([*lines, _md(shown), "", _image(plot, f"{column} by class")])


def section_localization(table: pd.DataFrame, out_dir: Path) -> str:
    """Body site per class: sites a class never shows are sites the model never learnt it on."""
    if "localization" not in table:
        return "## Body site\n\nNo `localization` column in the metadata."
    counts = _crosstab(table, "localization").T
    counts.index.name = "localization"
    total = counts.sum(axis=1)
    fig = _figure(6.0, 0.22 * len(counts) + 1.0)
    ax = fig.subplots()
    bars = ax.barh(counts.index, total)
    ax.bar_label(bars, labels=[f" {v:,}" for v in total], fontsize="x-small")
    ax.invert_yaxis()
    ax.set_xlim(0, total.max() * 1.15)
    ax.set_xlabel("images")
    ax.set_title("Body site (all classes)")
    plot = _save(fig, out_dir / "localization.png")
    shown = _with_total(counts.assign(total=total, **{"total %": _pct(total, total.sum())}))
    shown.loc["total", "total %"] = 100.0  # not the sum of rounded shares
    return "\n".join(
        [
            "## Body site (localization)",
            "",
            "Images per body site (rows) and class (columns).",
            "",
            _md(shown),
            "",
            _image(plot, "body site"),
        ]
    )


def _dx_type_note(table: pd.DataFrame) -> str:
    """How each label was confirmed: the strength of the ground truth differs by class."""
    if "dx_type" not in table:
        return ""
    known = [f"`{t}` = {DX_TYPE_MEANING[t]}" for t in DX_TYPE_MEANING if t in set(table["dx_type"])]
    return "How the diagnosis was confirmed: " + "; ".join(known) + "." if known else ""


def section_split(table: pd.DataFrame) -> str:
    """Images and lesions per class and split, and the leak check: what the reported metrics rest on."""
    if "split" not in table:
        return "## Split\n\nThe table has no `split` column (run through the DataModule to get one)."
    splits = [s for s in SPLITS if s in set(table["split"])]

    def per_class(values: pd.DataFrame) -> pd.DataFrame:
        counts = pd.crosstab(values["dx"], values["split"]).reindex(index=_classes(table), columns=splits, fill_value=0)
        counts.columns.name = None
        return _with_total(counts.assign(total=counts.sum(axis=1)))

    images = per_class(table)
    lesions = per_class(table.drop_duplicates(["lesion_id", "split"]))  # a leaked lesion counts in each split
    share = _pct(images.loc["total", splits], cast(int, images.loc["total", "total"]))  # a count
    return "\n".join(
        [
            "## Split",
            "",
            "The splits training uses with the same `data.*` settings. "
            f"Images per split: {', '.join(f'{s} {share[s]} %' for s in splits)}.",
            "",
            "Images per class and split:",
            "",
            _md(images),
            "",
            "Lesions per class and split:",
            "",
            _md(lesions),
            "",
            leak_check(table),
        ]
    )


def leak_check(table: pd.DataFrame) -> str:
    """The report states the leak check's outcome instead of failing, so a leaky split is documented too."""
    try:
        assert_no_leak(table)
    except DatasetError as err:
        leaked = int((table.groupby("lesion_id")["split"].nunique() > 1).sum())
        return f"**Leak check: FAILED.** {leaked:,} lesion(s) have images in more than one split. {err}"
    return (
        f"**Leak check: passed.** No `lesion_id` has images in more than one split "
        f"({table['lesion_id'].nunique():,} lesions checked with `assert_no_leak`)."
    )
