"""Build, offline, a folder of ordinary photos (not skin lesions) to measure the OOD gate of
lesionnet.inference.decision.ood.

Why these: the machines reach no image site, but some Python packages ship real photographs as sample data. The
photos are listed by hand (below) after a scan of the venv's site-packages for *.jpg/*.png: scikit-image's
``skimage.data`` (people, a cat, objects, textures, the moon, microscopy, a retina), scikit-learn's
``load_sample_images`` (china, flower) and matplotlib's ``sample_data`` (grace_hopper). Left out on purpose:
synthetic or drawn images (skimage chessboard, color, horse silhouette, logo, phantom; matplotlib logo2 and
Minduka_Present_Blue_Pack), 25x25 px faces (skimage lfw_subset), animations and stacks (gif, multipage tif), and
what else the scan found (icons of playwright, plots in networkx / sympy test baselines). A package that is not
installed is skipped with a note (``pip install -e .[ood]`` brings scikit-image and scikit-learn).

Each photo is written whole and, when it is large enough (``--min-crop``), as its four quadrants: more images per
photo, each a plausible photo on its own. Every image is RGB (greyscale photos become three equal channels), scaled
so its short side is between ``--min-side`` and ``--max-side`` px, saved as JPEG. Near-duplicates (perceptual hash
within ``PHASH_MATCH_BITS`` of an earlier image, as the training-leak guard uses) are dropped.

The split into two halves is by SCENE (a photo and its crops, or two views of one scene, stay together, so the half
that chooses the method never sees a piece of a photo in the half that reports), alternating over the scenes
sorted by category and then by the sha256 of the scene name: deterministic, each category in both halves.

    python scripts/build_ood_photos.py                       # -> logs/ood_photos/{images/, manifest.csv}
    python scripts/build_ood_photos.py --out /tmp/photos --no-crops

manifest.csv: name, source (package), file (inside the package), scene, category, variant (full, crop_tl, ...),
half (choose | report), width, height, phash.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from lesionnet.contract.provenance import PHASH_MATCH_BITS, nearest_distances
from lesionnet.data.decode import pil_to_rgb
from lesionnet.data.fingerprint import perceptual_hash

HALVES: tuple[str, str] = ("choose", "report")
MANIFEST_COLUMNS: tuple[str, ...] = (
    "name",
    "source",
    "file",
    "scene",
    "category",
    "variant",
    "half",
    "width",
    "height",
    "phash",
)


@dataclass(frozen=True)
class PhotoSource:
    """One photograph shipped inside a package: ``file`` is relative to the package's folder."""

    package: str
    file: str
    category: str
    scene: str = ""

    @property
    def name(self) -> str:
        return Path(self.file).stem

    @property
    def scene_name(self) -> str:
        return self.scene or self.name


SOURCES: tuple[PhotoSource, ...] = (
    PhotoSource("skimage", "data/astronaut.png", "person"),
    PhotoSource("skimage", "data/camera.png", "person"),
    PhotoSource("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "person"),
    PhotoSource("skimage", "data/chelsea.png", "animal"),
    PhotoSource("skimage", "data/coffee.png", "object"),
    PhotoSource("skimage", "data/coins.png", "object"),
    PhotoSource("skimage", "data/clock_motion.png", "object"),
    PhotoSource("skimage", "data/motorcycle_left.png", "object", scene="motorcycle"),
    PhotoSource("skimage", "data/motorcycle_right.png", "object", scene="motorcycle"),
    PhotoSource("skimage", "data/rocket.jpg", "scene"),
    PhotoSource("sklearn", "datasets/images/china.jpg", "scene"),
    PhotoSource("sklearn", "datasets/images/flower.jpg", "plant"),
    PhotoSource("skimage", "data/brick.png", "texture"),
    PhotoSource("skimage", "data/grass.png", "texture"),
    PhotoSource("skimage", "data/gravel.png", "texture"),
    PhotoSource("skimage", "data/moon.png", "astronomy"),
    PhotoSource("skimage", "data/hubble_deep_field.jpg", "astronomy"),
    PhotoSource("skimage", "data/text.png", "document"),
    PhotoSource("skimage", "data/page.png", "document"),
    PhotoSource("skimage", "data/cell.png", "microscopy"),
    PhotoSource("skimage", "data/ihc.png", "microscopy"),
    PhotoSource("skimage", "data/retina.jpg", "medical"),
    PhotoSource("skimage", "data/microaneurysms.png", "medical"),
)


def package_dir(package: str) -> Path | None:
    """Where an installed package lives, without importing it (None when it is not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resize_short_side(image: Image.Image, min_side: int, max_side: int) -> Image.Image:
    """Scale so the short side lies in [min_side, max_side] (unchanged when it already does)."""
    short = min(image.size)
    target = min(max(short, min_side), max_side)
    if target == short:
        return image
    scale = target / short
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def variants(image: Image.Image, min_crop: int | None) -> list[tuple[str, Image.Image]]:
    """The whole photo, plus its four quadrants when each has a short side of at least ``min_crop`` px."""
    out = [("full", image)]
    w, h = image.size
    if min_crop is not None and min(w // 2, h // 2) >= min_crop:
        boxes = {
            "crop_tl": (0, 0, w // 2, h // 2),
            "crop_tr": (w - w // 2, 0, w, h // 2),
            "crop_bl": (0, h - h // 2, w // 2, h),
            "crop_br": (w - w // 2, h - h // 2, w, h),
        }
        out += [(name, image.crop(box)) for name, box in boxes.items()]
    return out


def assign_halves(scenes: pd.DataFrame) -> dict[str, str]:
    """scene -> half: scenes sorted by category, then by sha256 of their name, alternately choose / report."""
    table = scenes.drop_duplicates("scene").copy()
    table["key"] = [hashlib.sha256(s.encode()).hexdigest() for s in table["scene"]]
    table = table.sort_values(["category", "key"]).reset_index(drop=True)
    return {scene: HALVES[i % 2] for i, scene in enumerate(table["scene"])}


def build(
    out: Path,
    sources: Sequence[PhotoSource] = SOURCES,
    min_side: int = 200,
    max_side: int = 512,
    min_crop: int | None = 100,
) -> pd.DataFrame:
    """Write the photos and ``manifest.csv`` into ``out``; return the manifest."""
    if min_side > max_side:
        raise ValueError(f"--min-side {min_side} is above --max-side {max_side}: the short side cannot be both.")
    images_dir = out / "images"
    manifest_file = out / "manifest.csv"
    if manifest_file.is_file():  # remove only what an earlier run of this script wrote
        for name in pd.read_csv(manifest_file)["name"]:
            (images_dir / str(name)).unlink(missing_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    missing: set[str] = set()
    for source in sources:
        root = package_dir(source.package)
        if root is None or not (root / source.file).is_file():
            missing.add(source.package if root is None else f"{source.package}/{source.file}")
            continue
        with Image.open(root / source.file) as raw:
            raw.load()
            photo = Image.fromarray(pil_to_rgb(raw))
        for variant, picture in variants(photo, min_crop):
            picture = resize_short_side(picture, min_side, max_side)
            phash = perceptual_hash(picture)
            known = [str(r["phash"]) for r in rows]
            if known and nearest_distances([phash], known)[0] <= PHASH_MATCH_BITS:
                print(f"skip {source.name}/{variant}: a near-duplicate of an earlier image", file=sys.stderr)
                continue
            name = f"{source.package}_{source.name}_{variant}.jpg"
            picture.save(images_dir / name, quality=92)
            rows.append(
                {
                    "name": name,
                    "source": source.package,
                    "file": f"{source.package}/{source.file}",
                    "scene": source.scene_name,
                    "category": source.category,
                    "variant": variant,
                    "width": picture.width,
                    "height": picture.height,
                    "phash": phash,
                }
            )
    for name in sorted(missing):
        print(f"not installed, skipped: {name} (pip install -e '.[ood]' for scikit-image and scikit-learn)")
    manifest = pd.DataFrame(rows, columns=[c for c in MANIFEST_COLUMNS if c != "half"])
    halves = assign_halves(manifest) if rows else {}
    manifest.insert(MANIFEST_COLUMNS.index("half"), "half", [halves[s] for s in manifest["scene"]])
    manifest.to_csv(manifest_file, index=False)
    return manifest


def summary(manifest: pd.DataFrame) -> str:
    """Images (scenes) per category and half, as a markdown table."""
    counts = manifest.groupby(["category", "half"]).agg(images=("name", "size"), scenes=("scene", "nunique"))
    table = counts.unstack("half", fill_value=0)
    cells = {
        half: [f"{table[('images', half)].get(c, 0)} ({table[('scenes', half)].get(c, 0)})" for c in table.index]
        for half in HALVES
        if ("images", half) in table
    }
    frame = pd.DataFrame(cells, index=table.index)
    frame.loc["total"] = [
        f"{(manifest['half'] == h).sum()} ({manifest.loc[manifest['half'] == h, 'scene'].nunique()})"
        for h in frame.columns
    ]
    return frame.to_markdown()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("logs/ood_photos"), help="output folder (gitignored)")
    parser.add_argument("--min-side", type=int, default=200, help="short side at least this many px (upscaled)")
    parser.add_argument("--max-side", type=int, default=512, help="short side at most this many px (downscaled)")
    parser.add_argument("--min-crop", type=int, default=100, help="quadrant crops when their short side >= this")
    parser.add_argument("--no-crops", action="store_true", help="whole photos only")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    manifest = build(
        args.out, min_side=args.min_side, max_side=args.max_side, min_crop=None if args.no_crops else args.min_crop
    )
    if manifest.empty:
        print("No sample photos found in the installed packages: pip install -e '.[ood]'.", file=sys.stderr)
        return 1
    print(f"{len(manifest)} images of {manifest['scene'].nunique()} scenes -> {args.out / 'manifest.csv'}")
    print("images (scenes) per category and half:\n" + summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
