"""Exploratory data analysis of a HAM10000 folder: one Markdown report (README.md) with tables and small plots.

``python -m lesionnet.eda data.root=../shared/data/ham10000_200x150 [out_dir=docs/eda]``

The table comes from the same DataModule config as train.py, so the split section shows exactly the
split every training run with these ``data.*`` settings uses. Counts are images unless a table says
lesions: one lesion (``lesion_id``) can have several images, and patient fields repeat across them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageOps

from lesionnet.classes import CLASS_LONG_NAMES, CLASS_NAMES
from lesionnet.cli import CONF_DIR
from lesionnet.data.metadata import DatasetError, preview_items
from lesionnet.data.split import SPLITS, assert_no_leak

log = logging.getLogger(__name__)

REPORT_FILE = "README.md"
DPI = 100
THUMB_SIZE = (96, 72)  # (width, height) of a grid cell: HAM10000 images are 4:3
UNKNOWN = "unknown"
DX_TYPE_MEANING: dict[str, str] = {
    "histo": "histopathology",
    "follow_up": "follow-up: unchanged at digital dermoscopy follow-up, not excised",
    "consensus": "expert consensus (typical benign cases without histology or follow-up)",
    "confocal": "in-vivo reflectance confocal microscopy",
}


# --------------------------------------------------------------------------------------------- helpers


def _classes(table: pd.DataFrame) -> list[str]:
    """Classes present, in the dataset's label order, so every table and plot lists them the same way."""
    present = set(table["dx"])
    return [c for c in CLASS_NAMES if c in present] + sorted(present - set(CLASS_NAMES))


def _md(df: pd.DataFrame, floatfmt: str | Sequence[str] = ".1f") -> str:
    """Markdown table; the index becomes a column so integer columns keep their integer format."""
    return df.reset_index().to_markdown(index=False, intfmt=",", floatfmt=floatfmt)


def _pct(part: pd.Series | pd.DataFrame, whole: pd.Series | float) -> pd.Series | pd.DataFrame:
    return (100 * part / whole).round(1)


def _with_total(df: pd.DataFrame, label: str = "total") -> pd.DataFrame:
    """Append a column-sum row, the number a reader checks first."""
    out = pd.concat([df, df.sum(numeric_only=True).to_frame(label).T.astype(df.dtypes.to_dict())])
    out.index.name = df.index.name
    return out


def _figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas, outside pyplot: nothing global is left open, so nothing leaks."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path, palette: bool = False) -> str:
    """Write the figure and free it; returns the file name for a relative Markdown link.

    ``palette`` stores photos as a 256-colour PNG: a third of the size of full RGB, with no visible loss.
    """
    if palette:
        fig.canvas.draw()
        rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
        Image.fromarray(rgb).quantize(256).save(path, optimize=True)
    else:
        fig.savefig(path, dpi=DPI)
    fig.clear()
    return path.name


def _image(name: str, alt: str) -> str:
    return f"![{alt}]({name})"


def _crosstab(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """Images per class (rows) and value of ``column`` (columns); missing values count as 'unknown'."""
    values = table[column].fillna(UNKNOWN).astype(str)
    counts = pd.crosstab(table["dx"], values).reindex(_classes(table), fill_value=0)
    order = sorted(counts.columns, key=lambda v: (v == UNKNOWN, -counts[v].sum(), v))
    counts = counts[order]
    counts.columns.name = None
    counts.index.name = "dx"
    return counts


def _share_plot(counts: pd.DataFrame, path: Path, title: str) -> str:
    """Stacked 100 % bars per class: compares the mix across classes of very different sizes."""
    share = counts.div(counts.sum(axis=1), axis=0) * 100
    fig = _figure(6.4, 0.3 * len(share) + 1.2)
    ax = fig.subplots()
    left = np.zeros(len(share))
    for column in share.columns:
        ax.barh(share.index, share[column], left=left, label=column)
        left += share[column].to_numpy()
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of the class's images")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)
    return _save(fig, path)


def _sample_per_class(table: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Up to ``n`` random images per class: bounded cost on the full set, reproducible by seed."""
    parts = [g.sample(n=min(n, len(g)), random_state=seed) for _, g in table.groupby("dx", sort=False)]
    return pd.concat(parts)


# --------------------------------------------------------------------------------------------- sections


def section_overview(table: pd.DataFrame, title: str, details: Mapping[str, object]) -> str:
    """Title, provenance and the image/lesion distinction every later number depends on."""
    lines = [f"# {title}", "", "Written by `python -m lesionnet.eda`.", ""]
    lines += [f"- {key}: {value}" for key, value in details.items()]
    lines += [
        f"- images: {len(table):,}; lesions (`lesion_id`): {table['lesion_id'].nunique():,}; "
        f"classes: {len(_classes(table))}",
        "",
        "Counts are images unless a table says lesions. One lesion can have several images, and its "
        "patient fields (age, sex, body site) repeat on each of them. The dataset has no patient id.",
    ]
    return "\n".join(lines)


def duplicate_images(table: pd.DataFrame) -> list[list[str]]:
    """Groups of image_ids whose files are byte-identical (only same-size files are hashed, so it is cheap)."""
    sizes = table["path"].map(lambda p: Path(p).stat().st_size)
    candidates = table[sizes.duplicated(keep=False)]
    digests = candidates["path"].map(lambda p: hashlib.sha1(Path(p).read_bytes()).hexdigest())
    groups = candidates.groupby(digests)["image_id"].agg(sorted)
    return sorted(g for g in groups if len(g) > 1)


def section_quality(table: pd.DataFrame) -> str:
    """Data-quality findings that change how numbers (or a model's use of metadata) should be read."""
    lines = ["## Data quality notes", ""]
    if "age" in table:
        age = table["age"]
        zero = int((age == 0).sum())
        lines.append(f"- age missing: {int(age.isna().sum()):,} images; age 0: {zero:,} images"
                     + (" (kept as given; 0 may be a placeholder rather than a newborn)" if zero else ""))
    for column in ("sex", "localization", "dx_type"):
        if column in table:
            unknown = table[column].isna() | (table[column].astype(str) == UNKNOWN)
            lines.append(f"- {column} missing or '{UNKNOWN}': {int(unknown.sum()):,} images")
    fields = [c for c in ("age", "sex", "localization") if c in table]
    if fields:
        missing = pd.concat([table[c].isna() | (table[c].astype(str) == UNKNOWN) for c in fields], axis=1)
        lines.append(f"- images with all of {', '.join(fields)} missing or '{UNKNOWN}': "
                     f"{int(missing.all(axis=1).sum()):,}")
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
    lines = [f"- byte-identical image files: {len(groups)} group(s), {len(across)} spanning more than one lesion "
             "(those could sit on both sides of a lesion-level split)"]
    lines += [f"  - {', '.join(g)} (lesion_id {', '.join(sorted(set(lesion_of[g])))})" for g in groups[:10]]
    return lines


def section_classes(table: pd.DataFrame, out_dir: Path) -> str:
    """Class balance by image and by lesion: the imbalance the loss weighting and metrics must handle."""
    classes = _classes(table)
    images = table["dx"].value_counts().reindex(classes)
    lesions = table.groupby("dx")["lesion_id"].nunique().reindex(classes)
    df = pd.DataFrame({
        "diagnosis": [CLASS_LONG_NAMES.get(c, c) for c in classes],
        "images": images, "images %": _pct(images, images.sum()),
        "lesions": lesions, "lesions %": _pct(lesions, lesions.sum()),
        "images per lesion": (images / lesions).round(2),
    }, index=pd.Index(classes, name="dx"))
    total = pd.DataFrame({"diagnosis": "", "images": images.sum(), "images %": 100.0, "lesions": lesions.sum(),
                          "lesions %": 100.0, "images per lesion": round(images.sum() / lesions.sum(), 2)},
                         index=pd.Index(["total"], name="dx"))
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
    return "\n".join(["## Classes", "", _md(pd.concat([df, total]), floatfmt=(*[".1f"] * 6, ".2f")), "",
                      _image(plot, "images and lesions per class")])


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
    return "\n".join([
        "## Images per lesion", "",
        "Lesions by their number of images, overall and per class (columns after `images` count lesions).", "",
        _md(_with_total(df)), "", _image(plot, "images per lesion"),
    ])


def section_age(table: pd.DataFrame, out_dir: Path) -> str:
    """Age by class, with missing and zero ages counted rather than silently dropped."""
    if "age" not in table:
        return "## Age\n\nNo `age` column in the metadata."
    classes = _classes(table)
    groups = table.groupby("dx")["age"]
    df = pd.DataFrame({
        "images": groups.size(), "age known": groups.count(), "age missing": groups.apply(lambda a: a.isna().sum()),
        "age 0": groups.apply(lambda a: (a == 0).sum()), "mean": groups.mean(), "median": groups.median(),
        "q1": groups.quantile(0.25), "q3": groups.quantile(0.75), "min": groups.min(), "max": groups.max(),
    }).reindex(classes)
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
    return "\n".join(["## Body site (localization)", "", "Images per body site (rows) and class (columns).", "",
                      _md(shown), "", _image(plot, "body site")])


def image_sizes(paths: Sequence[str]) -> pd.Series:
    """'WxH' of every image from its header only (no decoding): exact and fast even for the full set."""
    sizes = []
    for path in paths:
        with Image.open(path) as img:
            sizes.append(f"{img.width}x{img.height}")
    return pd.Series(sizes, dtype=str)


def channel_stats(paths: Sequence[str]) -> dict[str, float]:
    """Per-channel mean and std (0-1 scale) pooled over all pixels of ``paths``, like a normalisation would use."""
    total, total_sq, count = np.zeros(3), np.zeros(3), 0
    for path in paths:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
        total += pixels.sum(axis=0)
        total_sq += np.square(pixels).sum(axis=0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return {"images read": len(paths), **{f"{c} mean": m for c, m in zip("RGB", mean, strict=True)},
            **{f"{c} std": s for c, s in zip("RGB", std, strict=True)}}


def section_image_stats(table: pd.DataFrame, images_per_class: int, seed: int) -> str:
    """Image sizes (all headers) and per-class colour statistics (a bounded sample), for preprocessing choices."""
    sizes = image_sizes(table["path"].tolist()).value_counts()
    size_df = pd.DataFrame({"images": sizes, "%": _pct(sizes, sizes.sum())})
    size_df.index.name = "width x height"
    sample = _sample_per_class(table, images_per_class, seed)
    rows = {c: channel_stats(sample.loc[sample["dx"] == c, "path"].tolist()) for c in _classes(table)}
    rows["all (sample)"] = channel_stats(sample["path"].tolist())
    colour = pd.DataFrame.from_dict(rows, orient="index")
    colour["images read"] = colour["images read"].astype(int)
    colour.index.name = "dx"
    sampled = len(sample) < len(table)
    how = (f"a random sample of up to {images_per_class} images per class (seed {seed}; {len(sample):,} of "
           f"{len(table):,} images)" if sampled else f"all {len(table):,} images")
    return "\n".join([
        "## Image size and colour", "",
        f"Image sizes, from every file's header ({len(table):,} images):", "", _md(size_df), "",
        f"Per-channel mean and standard deviation of pixel values (0-1 scale), pooled over the pixels of {how}. "
        "The `all (sample)` row weights classes by the sample, not by the dataset.", "",
        _md(colour, floatfmt=".3f"),
    ])


def _thumbnail(path: str, size: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as img:
        img.draft("RGB", (size[0] * 2, size[1] * 2))  # JPEG: decode at reduced scale, much faster on big files
        return np.asarray(ImageOps.pad(img.convert("RGB"), size, color=(255, 255, 255)))


def grid_images(table: pd.DataFrame, columns: int, seed: int) -> dict[str, list[str]]:
    """Per class, the first image of up to ``columns`` random lesions: one per lesion, so no near-duplicates."""
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[str]] = {}
    for dx in _classes(table):
        rows = table[table["dx"] == dx].sort_values("image_id")
        lesions = rows["lesion_id"].drop_duplicates().to_numpy()
        picked = rng.choice(lesions, size=min(columns, len(lesions)), replace=False)
        first = rows.drop_duplicates("lesion_id").set_index("lesion_id")["path"]
        chosen[dx] = [first[lesion] for lesion in picked]
    return chosen


def section_sample_grid(table: pd.DataFrame, out_dir: Path, columns: int, seed: int) -> str:
    """What the classes look like: one thumbnail per lesion, so the grid has no near-duplicates."""
    chosen = grid_images(table, columns, seed)
    w, h = THUMB_SIZE
    mosaic = np.full((h * len(chosen), w * columns, 3), 255, dtype=np.uint8)
    for r, paths in enumerate(chosen.values()):
        for c, path in enumerate(paths):
            mosaic[r * h : (r + 1) * h, c * w : (c + 1) * w] = _thumbnail(path, THUMB_SIZE)
    fig = _figure(mosaic.shape[1] / DPI + 0.7, mosaic.shape[0] / DPI + 0.1)
    ax = fig.subplots()
    ax.imshow(mosaic, interpolation="none")
    ax.set_yticks([(r + 0.5) * h for r in range(len(chosen))], list(chosen))
    ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    plot = _save(fig, out_dir / "sample_grid.png", palette=True)
    return "\n".join([
        "## Sample images", "",
        f"Up to {columns} random lesions per class (seed {seed}), one image each, shown at {w}x{h} px.", "",
        _image(plot, "sample images per class"),
    ])


def section_split(table: pd.DataFrame) -> str:
    """Images and lesions per class and split, and the leak check: what the reported metrics rest on."""
    if "split" not in table:
        return "## Split\n\nThe table has no `split` column (run through the DataModule to get one)."
    splits = [s for s in SPLITS if s in set(table["split"])]

    def per_class(values: pd.DataFrame) -> pd.DataFrame:
        counts = pd.crosstab(values["dx"], values["split"]).reindex(index=_classes(table), columns=splits,
                                                                    fill_value=0)
        counts.columns.name = None
        return _with_total(counts.assign(total=counts.sum(axis=1)))

    images = per_class(table)
    lesions = per_class(table.drop_duplicates(["lesion_id", "split"]))  # a leaked lesion counts in each split
    share = _pct(images.loc["total", splits], images.loc["total", "total"])
    return "\n".join([
        "## Split", "",
        "The splits training uses with the same `data.*` settings. "
        f"Images per split: {', '.join(f'{s} {share[s]} %' for s in splits)}.", "",
        "Images per class and split:", "", _md(images), "",
        "Lesions per class and split:", "", _md(lesions), "",
        leak_check(table),
    ])


def leak_check(table: pd.DataFrame) -> str:
    """The report states the leak check's outcome instead of failing, so a leaky split is documented too."""
    try:
        assert_no_leak(table)
    except DatasetError as err:
        leaked = int((table.groupby("lesion_id")["split"].nunique() > 1).sum())
        return f"**Leak check: FAILED.** {leaked:,} lesion(s) have images in more than one split. {err}"
    return (f"**Leak check: passed.** No `lesion_id` has images in more than one split "
            f"({table['lesion_id'].nunique():,} lesions checked with `assert_no_leak`).")


# --------------------------------------------------------------------------------------------- report


def write_eda_report(
    table: pd.DataFrame,
    out_dir: Path,
    title: str,
    sample_grid: bool = True,
    *,
    images_per_class: int = 100,
    grid_columns: int = 6,
    seed: int = 0,
    details: Mapping[str, object] | None = None,
) -> Path:
    """Write ``out_dir/README.md`` and its PNGs from a validated table (``load_ham10000`` + optional ``split``).

    Colour statistics read at most ``images_per_class`` images per class so the report stays fast on the
    full set; image sizes come from every header. Returns the Markdown file's path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = [
        section_overview(table, title, details or {}),
        section_quality(table),
        section_classes(table, out_dir),
        section_images_per_lesion(table, out_dir),
        section_age(table, out_dir),
        section_categorical(table, out_dir, "sex", "Sex"),
        section_localization(table, out_dir),
        section_categorical(table, out_dir, "dx_type", "Diagnosis type (dx_type)", note=_dx_type_note(table)),
        section_image_stats(table, images_per_class, seed),
    ]
    if sample_grid:
        sections.append(section_sample_grid(table, out_dir, grid_columns, seed))
    sections.append(section_split(table))
    path = out_dir / REPORT_FILE
    path.write_text("\n\n".join(sections) + "\n")
    return path


def _dx_type_note(table: pd.DataFrame) -> str:
    """How each label was confirmed: the strength of the ground truth differs by class."""
    if "dx_type" not in table:
        return ""
    known = [f"`{t}` = {DX_TYPE_MEANING[t]}" for t in DX_TYPE_MEANING if t in set(table["dx_type"])]
    return "How the diagnosis was confirmed: " + "; ".join(known) + "." if known else ""


def run(cfg: DictConfig) -> Path:
    """Build the DataModule exactly as training does (same split), then write the report."""
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup()
    if dm.split_file:
        split = f"from `{dm.split_file}`"
    elif getattr(dm, "split", "lesion") == "legacy":
        split = f"legacy image-level split of the seed project, seed {dm.split_seed}"
    else:
        split = f"by lesion, fractions {OmegaConf.to_container(cfg.data.split_fractions)}, seed {dm.split_seed}"
    details = {"data root": f"`{cfg.data.root or dm.root}`", "split": split}
    return write_eda_report(
        dm.table, Path(cfg.out_dir), cfg.title, sample_grid=cfg.sample_grid,
        images_per_class=cfg.images_per_class, grid_columns=cfg.grid_columns, seed=cfg.sample_seed, details=details,
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eda")
def main(cfg: DictConfig) -> None:
    path = run(cfg)
    log.info("EDA report written: %s", path)


if __name__ == "__main__":
    main()
