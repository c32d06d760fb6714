"""Does a sketch of the model's own pooled features catch the crops the DCT hashes miss, without refusing new lesions?

    python bench/feature_sketch.py --run logs/train/runs/i21_cpu_lite0_cc_s42 \\
        --data-root ../shared/data/ham10000_200x150 --n-train 500 --seed 0 \\
        --features /tmp/feature_sketch.npz --json feature_sketch.json
    # 40 min of features and hashes on the two shared cores beside a training run (20,515 images, ~9 a second with
    # one thread), then 4-10 min of matching; rerun with the cached --features, only the matching

Protocol (issue 23: "a crop-invariant matcher, e.g. a sketch of the model's own pooled features"):
1. The run's checkpoint (``--ckpt``, default its best) loaded by the inference core (``load_members``) and its
   pooled pre-logit features taken by the one prediction path (``Predictor.predict_paths``: eval transform, colour
   constancy, ``forward_features`` -> ``forward_head(pre_logits=True)``, TTA ``--tta``), for every train+val image
   of the run's split.csv (the record).
2. Copies of ``--n-train`` training images drawn with ``--seed`` under every transform of
   bench/near_duplicates.py (its ``transforms`` and ``save``, imported; the same draws, so its DCT rows are
   reproduced), each written as a file and featurised from it; and every test-split image (lesions the record does
   not hold: a match is a false refusal). Each copy and test image is also matched by today's DCT hashes
   (``lesionnet.data.fingerprint``, ``PHASH_MATCH_BITS``), for the rule "refused if either matches".
   Features and DCT distances are cached in ``--features`` (rerunning with it only redoes step 3).
3. Sketches of the record, each fitted on the record alone (what training could store): the features centred on
   the record's mean and L2-normalised, then a seeded Gaussian random projection (``rp``), PCA (``pca``) or whitened
   PCA (``pcaw``) to ``--dims``, L2-normalised and stored as int8 (bytes per image: the dims, plus the shared mean
   and projection matrix as float16 spread over the record; a random projection is regenerated from its seed).
   Scores of a query: ``cosine`` = its nearest recorded image's cosine similarity; ``margin`` = that minus the
   nearest recorded image of another lesion (a ratio test: a copy is much nearer its source than any other lesion).
   Thresholds: ``oracle`` = the highest score of a test image but the 7 highest (refuses at most 0.5% of the 1,520:
   the most any threshold on that score can catch at that false-refusal rate; chosen on the test images themselves,
   so an upper bound); ``self q`` = the q-quantile of the record's own leave-lesion-out scores (each recorded image
   against the recorded images of other lesions: a threshold training could fix with no test data).

Prints markdown tables (stdout): per sketch, the share of both random-crop rows caught, the test images refused
(Wilson 95% upper bound) and the bytes per image; per transform, the best sketch's catch alone and with the hashes.
``--json`` keeps every number.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from near_duplicates import CONF, save, transforms  # the copies of the DCT table, not a second definition

from lesionnet.contract.provenance import PHASH_MATCH_BITS, nearest_matches
from lesionnet.data.decode import read_rgb
from lesionnet.data.fingerprint import fingerprints, provenance_of
from lesionnet.data.run_folder import RunFolder
from lesionnet.inference import Predictor, load_members
from lesionnet.inference.decision.ood import wilson_interval

RANDOM_CROPS = ("random crop keeping >= 60% of the area (anywhere)", "training augmentation, crop scale >= 0.6")
MAX_FALSE_REFUSALS = 0.005  # of the test images: the target
SELF_QUANTILES: tuple[float, ...] = (0.99, 0.995, 0.999, 1.0)
DCT_CAP = 40  # bits: distances kept exactly up to this


# ---------------------------------------------------------------------------------------------------- extraction


def split_tables(run: RunFolder, data_root: str) -> dict[str, pd.DataFrame]:
    return {split: run.split_table(split, data_root) for split in ("train", "val", "test")}


def extract(args: argparse.Namespace) -> dict[str, Any]:
    """Features (and DCT distances) of the record, the copies and the test images; see the module docstring."""
    torch.set_num_threads(args.threads)
    run = RunFolder(args.run)
    members = load_members(args.ckpt or str(run.path))  # the one checkpoint loader (a v1 record: unknown provenance)
    predictor = Predictor(members, tta=args.tta)
    tables = split_tables(run, args.data_root)
    if args.limit:  # a smoke run: the first images of each split
        tables = {split: table.head(args.limit) for split, table in tables.items()}
    record_table = pd.concat([tables["train"], tables["val"]], ignore_index=True)
    train, test = tables["train"], tables["test"]
    seconds: dict[str, float] = {}

    def features(paths: list[Any], what: str) -> np.ndarray:
        clock = time.perf_counter()
        out = predictor.predict_paths(paths, batch_size=args.batch_size, desc=what).features.astype(np.float32)
        seconds[what] = seconds.get(what, 0.0) + time.perf_counter() - clock
        print(f"{what}: {len(paths)} images, {time.perf_counter() - clock:.0f} s", file=sys.stderr, flush=True)
        return out

    clock = time.perf_counter()
    record = provenance_of(record_table)
    windows = record.windows()
    seconds["dct record"] = time.perf_counter() - clock

    def dct_distances(paths: list[Any]) -> np.ndarray:
        distances, _ = nearest_matches([p.views for p in fingerprints(paths)], windows, cap=DCT_CAP)
        return distances

    out: dict[str, Any] = {
        "record_features": features(list(record_table["path"]), "record"),
        "record_image_id": record_table["image_id"].to_numpy(dtype=str),
        "record_lesion_id": record_table["lesion_id"].to_numpy(dtype=str),
        "record_split": record_table["split"].to_numpy(dtype=str),
        "test_features": features(list(test["path"]), "test"),
        "test_image_id": test["image_id"].to_numpy(dtype=str),
        "test_dct_bits": dct_distances(list(test["path"])),
    }
    # The copies, drawn as bench/near_duplicates.py draws them (one generator: sources, then each transform in turn).
    rng = np.random.default_rng(args.seed)
    sources = np.sort(rng.choice(len(train), size=min(args.n_train, len(train)), replace=False))
    index = {image: k for k, image in enumerate(out["record_image_id"])}
    out["copy_source"] = np.array([index[i] for i in train["image_id"].iloc[sources]])
    conf = OmegaConf.load(CONF)
    jitter = {k: float(v) for k, v in conf.augment.color_jitter.items() if k != "p"}
    names = list(transforms(jitter))
    out["transforms"] = np.array(names)
    with tempfile.TemporaryDirectory() as tmp:
        for t, (name, (transform, quality)) in enumerate(transforms(jitter).items()):
            paths = []
            for k, path in enumerate(train["path"].iloc[sources]):
                copy = Path(tmp) / f"copy_{k}.jpg"
                save(transform(read_rgb(path), rng), copy, quality)
                paths.append(copy)
            out[f"copy_dct_bits_{t}"] = dct_distances(paths)
            out[f"copy_features_{t}"] = features(paths, f"copies: {name}")
    out["seconds"] = np.array(json.dumps(seconds))
    return out


# ------------------------------------------------------------------------------------------------------ sketches


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def int8(x: np.ndarray) -> np.ndarray:
    """Each row scaled to the int8 range by its own largest component (cosine does not need the scale back)."""
    scale = 127.0 / np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-12)
    return np.round(x * scale).astype(np.int8)


def sketch(record: np.ndarray, kind: str, dims: int) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
    """A map features -> stored vectors (unit-norm float rows, after int8 rounding) fitted on the record, and the
    bytes it shares across the record (float16 mean and projection; a seeded random projection needs none)."""
    mean = record.mean(axis=0)
    base = unit(record - mean)
    shared = 2 * record.shape[1]  # the mean, float16
    if kind == "full":  # no sketch: float32 features (reference)
        return lambda f: unit(f - mean), shared
    if kind == "rp":
        matrix = np.random.default_rng(0).standard_normal((record.shape[1], dims)) / np.sqrt(dims)
    else:
        _, values, vectors = np.linalg.svd(base - base.mean(axis=0), full_matrices=False)
        matrix = vectors[:dims].T
        if kind == "pcaw":
            matrix = matrix / (values[:dims] / np.sqrt(len(base)))
        shared += 2 * matrix.size

    def apply(f: np.ndarray) -> np.ndarray:
        return unit(int8(unit(f - mean) @ matrix).astype(np.float64))

    return apply, shared


def nearest(
    queries: np.ndarray, stored: np.ndarray, lesions: np.ndarray, exclude_lesion: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query: the best cosine, its index, and the best cosine among other lesions than the best one's
    (``exclude_lesion``: per query, a lesion code never matched: a recorded image against the others)."""
    best = np.empty(len(queries))
    second = np.empty(len(queries))
    index = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), 1024):
        sims = queries[start : start + 1024] @ stored.T
        if exclude_lesion is not None:
            sims[lesions[None, :] == exclude_lesion[start : start + 1024, None]] = -np.inf
        top = sims.argmax(axis=1)
        best[start : start + 1024] = sims[np.arange(len(top)), top]
        index[start : start + 1024] = top
        sims[lesions[None, :] == lesions[top][:, None]] = -np.inf
        second[start : start + 1024] = sims.max(axis=1)
    return best, index, second


def measure(cache: dict[str, Any], kind: str, dims: int) -> dict[str, Any]:
    record = cache["record_features"].astype(np.float64)
    lesions = pd.factorize(cache["record_lesion_id"])[0]
    apply, shared = sketch(record, kind, dims)
    stored = apply(record)
    names = list(cache["transforms"])
    scores: dict[str, dict[str, np.ndarray]] = {}

    def scored(features: np.ndarray, exclude: np.ndarray | None = None) -> dict[str, np.ndarray]:
        best, index, second = nearest(apply(features.astype(np.float64)), stored, lesions, exclude)
        return {"cosine": best, "margin": best - second, "index": index}

    scores["test"] = scored(cache["test_features"])
    scores["self"] = scored(record, lesions)  # leave-lesion-out: the record's own null
    for t, name in enumerate(names):
        scores[name] = scored(cache[f"copy_features_{t}"])
    source = cache["copy_source"]
    n_test = len(scores["test"]["cosine"])
    allowed = int(np.floor(MAX_FALSE_REFUSALS * n_test))
    result: dict[str, Any] = {
        "sketch": kind,
        "dims": dims,
        "bytes_per_image": (4 * record.shape[1] if kind == "full" else dims) + shared / len(record),
        "rules": [],
    }
    for score in ("cosine", "margin"):
        test_scores = np.sort(scores["test"][score])[::-1]
        thresholds = {"oracle": float(np.nextafter(test_scores[allowed], np.inf))}
        for q in SELF_QUANTILES:
            thresholds[f"self {q:g}"] = float(np.nextafter(np.quantile(scores["self"][score], q), np.inf))
        for label, threshold in thresholds.items():
            refused = int((scores["test"][score] >= threshold).sum())
            caught = {}
            for name in names:
                hit = scores[name][score] >= threshold
                same = lesions[scores[name]["index"]] == lesions[source]
                caught[name] = {"caught": int(hit.sum()), "same_lesion": int((hit & same).sum()), "n": len(hit)}
            result["rules"].append(
                {
                    "score": score,
                    "threshold": label,
                    "value": threshold,
                    "test_refused": refused,
                    "test_refused_upper95": wilson_interval(refused, n_test)[1],
                    "caught": caught,
                }
            )
    # how a copy's source ranks: the copy against its source vs its nearest other lesion
    result["source_cosine_median"] = {
        name: float(np.median(np.sum(apply(cache[f"copy_features_{t}"].astype(np.float64)) * stored[source], axis=1)))
        for t, name in enumerate(names)
    }
    result["nearest_is_source"] = {name: float(np.mean(scores[name]["index"] == source)) for name in names}
    result["nearest_of_its_lesion"] = {
        name: float(np.mean(lesions[scores[name]["index"]] == lesions[source])) for name in names
    }
    result["test_cosine_quantiles"] = {
        str(q): float(np.quantile(scores["test"]["cosine"], q)) for q in (0.5, 0.9, 0.99, 0.995)
    }
    result["_scores"] = scores
    return result


# ---------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="train.py run folder (its split.csv and best checkpoint)")
    parser.add_argument("--ckpt", help="checkpoint (default: the run's best)")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--n-train", type=int, default=500, help="training images to copy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tta", default="none")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 beats 2 when another job shares the two cores)"
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--limit", type=int, default=0, help="smoke run: only the first N images of each split")
    parser.add_argument("--features", type=Path, help="cache of step 1-2 (.npz): read when it exists, else written")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.features and args.features.exists():
        cache = dict(np.load(args.features, allow_pickle=False))
    else:
        cache = extract(args)
        if args.features:
            np.savez(args.features, **cache)
    extract_s = json.loads(str(cache["seconds"]))
    names = list(cache["transforms"])
    n_test = len(cache["test_image_id"])

    results = [measure(cache, "full", 0)]
    results += [measure(cache, kind, d) for kind in ("rp", "pca", "pcaw") for d in args.dims]

    print(
        f"\nRecord: {len(cache['record_image_id']):,} train+val images, {cache['record_features'].shape[1]} pooled "
        f"features each (tta {args.tta}); copies of {len(cache['copy_source'])} training images (seed {args.seed}); "
        f"{n_test:,} test images.\n"
    )
    crop_a, crop_b = RANDOM_CROPS
    print(
        "| sketch | bytes/image | score | threshold | random crop >= 60% caught | training aug. >= 0.6 caught | "
        "test refused (95% upper) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        label = "float32 (no sketch)" if r["sketch"] == "full" else f"{r['sketch']} {r['dims']} int8"
        for rule in r["rules"]:
            a, b = rule["caught"][crop_a], rule["caught"][crop_b]
            print(
                f"| {label} | {r['bytes_per_image']:.0f} | {rule['score']} | {rule['threshold']} "
                f"({rule['value']:.3f}) | {a['caught'] / a['n']:.1%} | {b['caught'] / b['n']:.1%} | "
                f"{rule['test_refused']}/{n_test} ({rule['test_refused_upper95']:.1%}) |"
            )

    # Per transform: the sketch catching most of the random crops at the oracle threshold, alone and with the hashes.
    def crops_caught(rule: dict[str, Any]) -> int:
        return min(rule["caught"][crop_a]["caught"], rule["caught"][crop_b]["caught"])

    best_result, best_rule = max(
        ((r, rule) for r in results if r["sketch"] != "full" for rule in r["rules"] if rule["threshold"] == "oracle"),
        key=lambda pair: crops_caught(pair[1]),
    )
    threshold, score = best_rule["value"], best_rule["score"]
    scores = best_result["_scores"]
    dct_test = cache["test_dct_bits"] <= PHASH_MATCH_BITS
    either_test = int((dct_test | (scores["test"][score] >= threshold)).sum())
    print(
        f"\nPer transform: {best_result['sketch']} {best_result['dims']} int8, {score} >= {threshold:.3f} (the oracle "
        f"threshold of the sketch that catches most random crops), and the DCT hashes (<= {PHASH_MATCH_BITS} bits):\n"
    )
    print("| copy of a training image | feature sketch | of which its lesion | DCT hashes | either | source cosine |")
    print("|---|---|---|---|---|---|")
    per_transform = []
    for t, name in enumerate(names):
        feature_hit = scores[name][score] >= threshold
        dct_hit = cache[f"copy_dct_bits_{t}"] <= PHASH_MATCH_BITS
        row = {
            "transform": name,
            "n": len(feature_hit),
            "feature": int(feature_hit.sum()),
            "feature_same_lesion": best_rule["caught"][name]["same_lesion"],
            "dct": int(dct_hit.sum()),
            "either": int((feature_hit | dct_hit).sum()),
            "source_cosine_median": best_result["source_cosine_median"][name],
        }
        per_transform.append(row)
        n = row["n"]
        print(
            f"| {name} | {row['feature'] / n:.1%} | {row['feature_same_lesion']} | {row['dct'] / n:.1%} | "
            f"{row['either'] / n:.1%} | {row['source_cosine_median']:.3f} |"
        )
    print(
        f"| test images refused (other lesions) | {best_rule['test_refused']}/{n_test} | | {int(dct_test.sum())}/"
        f"{n_test} | {either_test}/{n_test} (95% upper {wilson_interval(either_test, n_test)[1]:.1%}) | |"
    )
    print(
        "\nWhere a copy lands (the record's nearest image by cosine; no threshold): float32 features, and the "
        "sketch above:\n"
    )
    print(
        "| copy of a training image | sketch | cosine to its source (median) | nearest is its source | "
        "nearest is of its lesion |"
    )
    print("|---|---|---|---|---|")
    for r in (results[0], best_result):
        label = "float32 (no sketch)" if r["sketch"] == "full" else f"{r['sketch']} {r['dims']} int8"
        for name in (names[0], names[1], *RANDOM_CROPS):
            print(
                f"| {name} | {label} | {r['source_cosine_median'][name]:.3f} | {r['nearest_is_source'][name]:.1%} | "
                f"{r['nearest_of_its_lesion'][name]:.1%} |"
            )
        q = r["test_cosine_quantiles"]
        print(
            f"| test image (another lesion): its nearest recorded image | {label} | median {q['0.5']:.3f}, "
            f"99.5th percentile {q['0.995']:.3f} | | |"
        )
    met = [
        (r["sketch"], r["dims"], rule["score"], rule["threshold"])
        for r in results
        for rule in r["rules"]
        if rule["test_refused"] <= MAX_FALSE_REFUSALS * n_test
        and all(rule["caught"][c]["caught"] >= 0.95 * rule["caught"][c]["n"] for c in RANDOM_CROPS)
    ]
    print(f"\nSettings catching >= 95% of both random-crop rows with <= 0.5% of test images refused: {met or 'none'}")
    total_s = time.perf_counter() - started
    print(f"Times: extraction {json.dumps({k: round(v) for k, v in extract_s.items()})} s; this run {total_s:.0f} s.")
    if args.json:
        for r in results:
            r.pop("_scores")
        args.json.write_text(
            json.dumps(
                {
                    "checkpoint": args.ckpt or str(args.run),
                    "tta": args.tta,
                    "record_images": len(cache["record_image_id"]),
                    "n_train_copied": len(cache["copy_source"]),
                    "n_test": n_test,
                    "seed": args.seed,
                    "sketches": results,
                    "per_transform": per_transform,
                    "either_test_refused": either_test,
                    "settings_meeting_target": met,
                    "seconds": {"extraction": extract_s, "total": total_s},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
