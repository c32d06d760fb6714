"""Which copies of training images does the leak guard catch, and how many unseen test images does it refuse?

    python bench/near_duplicates.py --data-root ../shared/data/ham10000_200x150 --n-train 500 --seed 0 \\
        [--json near_duplicates.json] [--pairs-png flagged_pairs.png]

Protocol (the guard as evaluate.py runs it: lesionnet.data.fingerprint and lesionnet.contract.provenance):
1. The split train.py makes by default (lesion-level, data.split_fractions and data.split_seed of
   lesionnet/conf/data/ham10000.yaml) and the provenance record of its train+val images, as train.py stores it.
2. Copies: ``--n-train`` training images drawn at random (``--seed``); each transform of ``transforms`` is applied,
   the copy written as a file (JPEG quality 95 unless the transform says otherwise; the EXIF row stores the pixels
   rotated with orientation tag 6, which decodes to the original), fingerprinted as evaluate.py fingerprints a scored
   image and matched against the whole record. Caught: within PHASH_MATCH_BITS of a window of any recorded image
   (the column "its source" says how many matched the image they were made from).
3. False refusals: every test-split image (lesions the record does not hold, by construction) matched the same way;
   each match is listed with the recorded image it matched, whether the files are byte-identical and how well their
   fine detail correlates (``detail_correlation``).
4. HAM10000's own duplicates: every image of the dataset matched against every other image's windows. Matches within
   one lesion are counted (re-shoots, byte-identical pairs); matches across two lesion ids are listed: the same photo
   filed under two lesion ids, or a false match. Which is which is decided by looking at them (``--pairs-png``).

Prints a markdown table (stdout); ``--json`` keeps every number, ``--pairs-png`` draws the matched test/record pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import albumentations as A
import numpy as np
from omegaconf import OmegaConf
from PIL import Image, ImageEnhance
from scipy import ndimage

from lesionnet.contract.provenance import PHASH_MATCH_BITS, nearest_matches
from lesionnet.data.decode import read_rgb
from lesionnet.data.fingerprint import WINDOWS, fingerprints, luma, provenance_of
from lesionnet.data.metadata import load_ham10000
from lesionnet.data.split import split_lesions

CONF = Path(__file__).resolve().parents[1] / "lesionnet" / "conf" / "data" / "ham10000.yaml"
THRESHOLDS: tuple[int, ...] = (28, 32, 36, 40)  # the trade-off the table shows (bits of 255)
Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def crop(rgb: np.ndarray, left: float, top: float, right: float, bottom: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    return rgb[round(top * h) : round(bottom * h), round(left * w) : round(right * w)]


def one_side(rgb: np.ndarray, rng: np.random.Generator, cut: float = 0.1) -> np.ndarray:
    side = [(cut, 0, 1, 1), (0, 0, 1 - cut, 1), (0, cut, 1, 1), (0, 0, 1, 1 - cut)][rng.integers(4)]
    return crop(rgb, *side)


def random_crop(rgb: np.ndarray, rng: np.random.Generator, min_area: float = 0.6) -> np.ndarray:
    """A crop keeping a random share in [min_area, 1] of the area, aspect ratio x 3/4..4/3, anywhere."""
    while True:
        area, ratio = rng.uniform(min_area, 1.0), np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w, h = np.sqrt(area * ratio), np.sqrt(area / ratio)
        if w <= 1 and h <= 1:
            break
    left, top = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    return crop(rgb, left, top, left + w, top + h)


def enhance(kind: type[ImageEnhance._Enhance], factor: float) -> Transform:
    return lambda rgb, _: np.asarray(kind(Image.fromarray(rgb)).enhance(factor))  # type: ignore[call-arg]


def hue(shift: float) -> Transform:
    def apply(rgb: np.ndarray, _: np.random.Generator) -> np.ndarray:
        hsv = np.asarray(Image.fromarray(rgb).convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(shift * 255)) % 256
        return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))

    return apply


def colour_jitter(jitter: dict[str, float]) -> Transform:
    """The training augmentation's ColorJitter, every part drawn within its range."""

    def apply(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pipeline = A.Compose([A.ColorJitter(**jitter, p=1.0)], seed=int(rng.integers(2**31)))
        return np.asarray(pipeline(image=np.ascontiguousarray(rgb))["image"])

    return apply


def training_augmentation(jitter: dict[str, float], min_scale: float) -> Transform:
    """The training pipeline's geometry and colour (lesionnet.data.transforms), at the data's own size."""

    def apply(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = rgb.shape[:2]
        pipeline = A.Compose(
            [
                A.RandomRotate90(p=0.5),
                A.RandomResizedCrop(size=(h, w), scale=(min_scale, 1.0), ratio=(w / h * 3 / 4, w / h * 4 / 3)),
                A.HorizontalFlip(p=0.5),
                A.VerticalFlip(p=0.5),
                A.ColorJitter(**jitter, p=1.0),
            ],
            seed=int(rng.integers(2**31)),
        )
        return np.asarray(pipeline(image=np.ascontiguousarray(rgb))["image"])

    return apply


def transforms(jitter: dict[str, float]) -> dict[str, tuple[Transform, int]]:
    """Name -> (transform, JPEG quality the copy is saved at)."""
    b, c, s, h = (jitter[k] for k in ("brightness", "contrast", "saturation", "hue"))
    colour = {"brightness": b, "contrast": c, "saturation": s, "hue": h}
    small = lambda rgb, _: np.asarray(  # noqa: E731
        Image.fromarray(rgb).resize((round(rgb.shape[1] * 0.9), round(rgb.shape[0] * 0.9)), Image.Resampling.BICUBIC)
    )
    return {
        "unchanged (renamed)": (lambda rgb, _: rgb, 95),
        "horizontal flip": (lambda rgb, _: rgb[:, ::-1], 95),
        "vertical flip": (lambda rgb, _: rgb[::-1], 95),
        "rotated 90°": (lambda rgb, _: np.rot90(rgb), 95),
        "transposed": (lambda rgb, _: np.swapaxes(rgb, 0, 1), 95),
        "pixels rotated + EXIF orientation 6": (lambda rgb, _: rgb, -6),  # saved rotated, tagged to turn back
        "crop 10% off one side": (one_side, 95),
        "crop 5% each side": (lambda rgb, _: crop(rgb, 0.05, 0.05, 0.95, 0.95), 95),
        "crop to 60% of the area (centre)": (lambda rgb, _: crop(rgb, 0.1127, 0.1127, 0.8873, 0.8873), 95),
        "resize 90% + JPEG q75": (small, 75),
        "brightness x1.1": (enhance(ImageEnhance.Brightness, 1.1), 95),
        f"brightness x{1 - b:g} / x{1 + b:g}": (
            lambda rgb, r: enhance(ImageEnhance.Brightness, r.choice([1 - b, 1 + b]))(rgb, r),
            95,
        ),
        f"contrast x{1 - c:g} / x{1 + c:g}": (
            lambda rgb, r: enhance(ImageEnhance.Contrast, r.choice([1 - c, 1 + c]))(rgb, r),
            95,
        ),
        f"saturation x{1 - s:g} / x{1 + s:g}": (
            lambda rgb, r: enhance(ImageEnhance.Color, r.choice([1 - s, 1 + s]))(rgb, r),
            95,
        ),
        f"hue ±{h:g}": (lambda rgb, r: hue(float(r.choice([-h, h])))(rgb, r), 95),
        "colour jitter (all four within the ranges)": (colour_jitter(colour), 95),
        "flip + crop 10% off one side + colour jitter": (
            lambda rgb, r: colour_jitter(colour)(one_side(rgb[:, ::-1], r), r),
            95,
        ),
        "crop 30% off one side": (lambda rgb, r: one_side(rgb, r, 0.3), 95),
        "crop to 60% of the area (a corner)": (
            lambda rgb, r: crop(rgb, *[(0, 0, 0.775, 0.775), (0.225, 0.225, 1, 1)][r.integers(2)]),
            95,
        ),
        "random crop keeping >= 60% of the area (anywhere)": (random_crop, 95),
        "training augmentation, crop scale >= 0.6": (training_augmentation(colour, 0.6), 95),
    }


def save(rgb: np.ndarray, path: Path, quality: int) -> None:
    if quality == -6:  # EXIF orientation 6 = "rotate 90° clockwise to display": store the pixels turned back
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1))).save(path, quality=95, exif=exif)
    else:
        Image.fromarray(np.ascontiguousarray(rgb)).save(path, quality=quality)


def detail_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Best correlation of two pictures' fine detail (96x96 luma less its blur) over the eight D4 views: near 1 for
    one photo twice, low for two lesions that merely look alike (their blur is alike, their detail is not). A copy
    cropped or shifted by a few pixels also scores low: a match is a duplicate only once seen (``--pairs-png``)."""

    def detail(rgb: np.ndarray) -> np.ndarray:
        grey = np.asarray(Image.fromarray(luma(rgb)).resize((96, 96), Image.Resampling.BOX), dtype=np.float64)
        fine = grey - ndimage.gaussian_filter(grey, 3)
        return (fine - fine.mean()) / (fine.std() + 1e-9)

    x, base = detail(a), detail(b)
    views = [v for m in (base, base.T) for v in (m, m[:, ::-1], m[::-1], m[::-1, ::-1])]
    return max(float((x * view).mean()) for view in views)


def draw_pairs(pairs: list[tuple[str, str]], paths: dict[str, str], out: Path) -> None:
    """Each matched pair side by side, one row each (200x150 tiles)."""
    tiles = [
        np.concatenate([np.asarray(Image.fromarray(read_rgb(paths[i])).resize((200, 150))) for i in pair], axis=1)
        for pair in pairs
    ]
    Image.fromarray(np.concatenate(tiles, axis=0)).save(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--n-train", type=int, default=500, help="training images to copy")
    parser.add_argument("--n-test", type=int, default=0, help="test images to match (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--pairs-png", type=Path)
    args = parser.parse_args(argv)
    conf = OmegaConf.load(CONF)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()

    table = load_ham10000(args.data_root, check_headers=False)
    table["split"] = split_lesions(table, dict(conf.split_fractions), int(conf.split_seed)).to_numpy()
    clock = time.perf_counter()
    record = provenance_of(table)
    record_s = time.perf_counter() - clock
    windows = record.windows()
    stored_bytes = sum(len(text) for text in record.dct_windows) / len(record.dct_windows)
    print(
        f"record: {len(record.image_id)} train+val images, {len(WINDOWS)} windows, {stored_bytes:.0f} characters of "
        f"dct_windows per image, fingerprinted in {record_s:.0f} s",
        file=sys.stderr,
    )

    train = table[table["split"] == "train"]
    sources = train.iloc[np.sort(rng.choice(len(train), size=min(args.n_train, len(train)), replace=False))]
    jitter = {k: float(v) for k, v in conf.augment.color_jitter.items() if k != "p"}
    rows = []
    match_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, (transform, quality) in transforms(jitter).items():
            paths = []
            for k, path in enumerate(sources["path"]):
                copy = Path(tmp) / f"copy_{k}.jpg"
                save(transform(read_rgb(path), rng), copy, quality)
                paths.append(copy)
            prints = fingerprints(paths)
            clock = time.perf_counter()
            distances, nearest = nearest_matches([p.views for p in prints], windows, cap=max(THRESHOLDS))
            match_s += time.perf_counter() - clock
            caught = distances <= PHASH_MATCH_BITS
            own = np.array(
                [
                    record.image_id[j] == i if j >= 0 else False
                    for i, j in zip(sources["image_id"], nearest, strict=True)
                ]
            )
            rows.append(
                {
                    "transform": name,
                    "n": len(paths),
                    "caught": int(caught.sum()),
                    "its_source": int((caught & own).sum()),
                    "caught_within": {t: int((distances <= t).sum()) for t in THRESHOLDS},
                }
            )
            print(f"{name}: {caught.mean():.1%}", file=sys.stderr)
    n_copies = sum(r["n"] for r in rows)

    test = table[table["split"] == "test"]
    if args.n_test:
        test = test.iloc[np.sort(rng.choice(len(test), size=min(args.n_test, len(test)), replace=False))]
    prints = fingerprints(test["path"])
    clock = time.perf_counter()
    distances, nearest = nearest_matches([p.views for p in prints], windows, cap=48)
    test_match_s = time.perf_counter() - clock
    near = {t: int((distances <= t).sum()) for t in (*THRESHOLDS, 44, 48)}
    paths = dict(zip(table["image_id"], table["path"], strict=True))
    lesion = dict(zip(table["image_id"], table["lesion_id"], strict=True))

    def described(scored: str, recorded: str, bits: int, identical: bool) -> dict[str, object]:
        return {
            "image": scored,
            "lesion": lesion[scored],
            "matched_image": recorded,
            "matched_lesion": lesion[recorded],
            "bits": bits,
            "byte_identical": identical,
            "detail_correlation": round(detail_correlation(read_rgb(paths[scored]), read_rgb(paths[recorded])), 3),
        }

    flagged = [
        described(
            test["image_id"].iloc[k],
            record.image_id[nearest[k]],
            int(distances[k]),
            prints[k].sha256 == record.sha256[nearest[k]],
        )
        for k in np.flatnonzero(distances <= PHASH_MATCH_BITS)
    ]

    # HAM10000's own duplicates: every image against every other image's windows (the split set aside).
    everything = fingerprints(table["path"])
    clock = time.perf_counter()
    all_distances, all_nearest = nearest_matches(
        [p.views for p in everything], [p.windows for p in everything], exclude=list(range(len(table)))
    )
    scan_s = time.perf_counter() - clock
    ids = table["image_id"].tolist()
    matched = np.flatnonzero(all_distances <= PHASH_MATCH_BITS)
    same_lesion = [k for k in matched if lesion[ids[k]] == lesion[ids[all_nearest[k]]]]
    other_lesion = [
        described(
            ids[k],
            ids[all_nearest[k]],
            int(all_distances[k]),
            everything[k].sha256 == everything[all_nearest[k]].sha256,
        )
        for k in matched
        if k not in set(same_lesion)
    ]

    print(
        f"\nRecord: {len(record.image_id):,} train+val images x {len(WINDOWS)} windows; "
        f"threshold {PHASH_MATCH_BITS}/255 bits."
    )
    print(f"Copies of {len(sources)} training images (seed {args.seed}):\n")
    others = [t for t in THRESHOLDS if t != PHASH_MATCH_BITS]
    print(
        f"| copy of a training image | caught (<= {PHASH_MATCH_BITS} bits) | of which its source | "
        + " | ".join(f"<= {t} bits" for t in others)
        + " |"
    )
    print("|---|---|---|" + "---|" * len(others))
    for r in rows:
        shares = " | ".join(f"{r['caught_within'][t] / r['n']:.1%}" for t in others)
        print(
            f"| {r['transform']} | {r['caught']}/{r['n']} ({r['caught'] / r['n']:.1%}) | {r['its_source']} | {shares} |"
        )
    refused = [f for f in flagged if not f["byte_identical"]]
    print(
        f"\nTest-split images (lesions the record does not hold): {len(test)}; refused: {len(flagged)} "
        f"({len(flagged) / len(test):.2%}; {len(flagged) - len(refused)} byte-identical to a recorded image)."
    )
    print(f"Test images within t bits of a recorded window: {near}")
    for f in flagged:
        print(f"- {f}")
    print(
        f"\nWhole dataset, each image against every other ({len(table):,}): {len(same_lesion)} match an image of "
        f"their own lesion (re-shoots, HAM10000's byte-identical pairs); {len(other_lesion)} match an image of "
        "another lesion id (the same photo filed under two lesion ids, or a false match: look at --pairs-png):"
    )
    for f in other_lesion:
        print(f"- {f}")
    total_s = time.perf_counter() - started
    print(
        f"\nTimes: record {record_s:.0f} s; matching {n_copies} copies {match_s:.1f} s, {len(test)} test images "
        f"{test_match_s:.1f} s, the whole dataset against itself {scan_s:.1f} s; whole run {total_s:.0f} s."
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "threshold_bits": PHASH_MATCH_BITS,
                    "windows": [list(w) for w in WINDOWS],
                    "record_images": len(record.image_id),
                    "dct_windows_chars_per_image": stored_bytes,
                    "n_train_copied": len(sources),
                    "seed": args.seed,
                    "copies": rows,
                    "n_test": len(test),
                    "test_within_bits": near,
                    "test_refused": flagged,
                    "dataset_same_lesion_matches": len(same_lesion),
                    "dataset_other_lesion_matches": other_lesion,
                    "seconds": {
                        "record": record_s,
                        "match_copies": match_s,
                        "match_test": test_match_s,
                        "scan_dataset": scan_s,
                        "total": total_s,
                    },
                },
                indent=2,
            )
        )
    pairs = [(f["image"], f["matched_image"]) for f in (*flagged, *other_lesion)]
    if args.pairs_png and pairs:
        draw_pairs(pairs, paths, args.pairs_png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
