"""Which OOD score refuses ordinary photos and keeps lesion images? Fit on validation, choose on one half of the
photos, report on the other.

    python scripts/build_ood_photos.py                                     # -> logs/ood_photos/ (once)
    python bench/ood_eval.py --run logs/train/runs/<run> --data-root ../shared/data/ham10000_200x150 \\
        --max-test 500 --json ood_eval.json --gate-out ood_gate.json

Protocol (nothing that reports was used to choose):
1. Features of the run's checkpoint (``--ckpt``, default the run's best) for ``--max-val`` validation images,
   ``--max-test`` test images (random samples with ``--seed``) and every photo of ``--photos`` (its manifest.csv).
   Cap validation only to save CPU: with a few hundred images the threshold under-covers (see
   lesionnet.inference.decision.ood).
2. Each candidate of lesionnet.inference.decision.ood (Mahalanobis with one mean or class means, kNN with k=1 and k=5)
   is fitted on the validation features (class means from the true dx, folds grouped by lesion); its threshold is the
   ``--quantile`` of the out-of-sample validation scores. Baselines on the classifier's output (negative energy,
   max softmax) get the same quantile rule but cannot be chosen: they are not feature-space gates.
3. Choice, on the "choose" half of the photos only: the most photos refused at the threshold, then the higher OOD
   AUROC (choose photos vs out-of-sample validation scores), then the candidate listed first (Mahalanobis first:
   a matmul in an exported ONNX graph; kNN needs every validation feature in it).
4. Report, on the "report" half and the test split: k/N photos refused with a Wilson 95% interval, the share of test
   lesion images the gate alone refuses, OOD AUROC (report photos vs test lesion images). Also what today's image
   check refuses, alone and together with the chosen gate.

Prints a markdown table (stdout) and writes every number to ``--json``; ``--gate-out`` saves the chosen gate.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionnet.contract.files import ContractError
from lesionnet.data.run_folder import RunFolder
from lesionnet.inference import Prediction, Predictor, load_members, read_rgb
from lesionnet.inference.decision.image_check import check_image
from lesionnet.inference.decision.ood import (
    DEFAULT_QUANTILE,
    OodGate,
    fit_ood_features,
    ood_auroc,
    quantile_threshold,
    wilson_interval,
)

HALVES = ("choose", "report")


@dataclass(frozen=True)
class Candidate:
    """A score to compare: a feature-space gate (``method``, ``k``) or a baseline on the classifier's output."""

    name: str
    method: str | None = None
    k: int = 1
    baseline: Callable[[Prediction], np.ndarray] | None = None
    onnx: str = ""


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("mahalanobis", "mahalanobis", onnx="matmul: mean (D) + precision (D x D)"),
    Candidate("mahalanobis_class", "mahalanobis_class", onnx="matmul: class means (K x D) + precision (D x D)"),
    Candidate("knn1", "knn", k=1, onnx="matmul + top-k: all N x D validation features"),
    Candidate("knn5", "knn", k=5, onnx="matmul + top-k: all N x D validation features"),
    Candidate("energy (baseline)", baseline=lambda p: -p.neg_energy, onnx="logsumexp of the logits"),
    Candidate("msp (baseline)", baseline=lambda p: -p.msp, onnx="max softmax"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="train.py run folder (split.csv, checkpoints/)")
    parser.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: the run's best)")
    parser.add_argument("--data-root", type=Path, default=None, help="the run's data (default: its metrics.json)")
    parser.add_argument("--photos", type=Path, default=Path("logs/ood_photos"), help="scripts/build_ood_photos.py")
    parser.add_argument("--max-val", type=int, default=None, help="validation images to fit on (random sample)")
    parser.add_argument("--max-test", type=int, default=None, help="test images to report on (random sample)")
    parser.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE, help="threshold quantile on validation")
    parser.add_argument("--folds", type=int, default=5, help="lesion-grouped folds for out-of-sample scores")
    parser.add_argument("--tta", default="none", help="test-time augmentation of the predictor")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="for the validation/test samples")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--gate-out", type=Path, default=None, help="save the chosen gate here (JSON)")
    return parser.parse_args(argv)


def sample_split(run: RunFolder, split: str, data_root: Path | None, limit: int | None, seed: int) -> pd.DataFrame:
    """The run's images of ``split``, a random sample of ``limit`` of them when given (CPU budget)."""
    try:
        table = run.split_table(split, data_root)
    except ContractError as err:
        raise SystemExit(f"{err} Pass --data-root (the folder the run was trained on).") from err
    if limit is not None and limit < len(table):
        table = table.sample(n=limit, random_state=seed).reset_index(drop=True)
    return table


def load_photos(folder: Path) -> pd.DataFrame:
    """manifest.csv of scripts/build_ood_photos.py, with each image's path; both halves must be there."""
    manifest_file = folder / "manifest.csv"
    if not manifest_file.is_file():
        raise SystemExit(
            f"No {manifest_file}: build the photos first (python scripts/build_ood_photos.py --out {folder})."
        )
    photos = pd.read_csv(manifest_file)
    photos["path"] = [str(folder / "images" / name) for name in photos["name"]]
    absent = [half for half in HALVES if not (photos["half"] == half).any()]
    if absent:
        raise SystemExit(
            f"{manifest_file} has no '{absent[0]}' photos: install more sample images (pip install -e '.[ood]') "
            "and rebuild it with scripts/build_ood_photos.py."
        )
    return photos


def rate(flags: np.ndarray) -> dict[str, Any]:
    """k/N with a Wilson 95% interval."""
    k, n = int(np.sum(flags)), len(flags)
    low, high = wilson_interval(k, n)
    return {"k": k, "n": n, "share": k / n, "wilson95": [low, high]}


def fmt_rate(r: dict[str, Any]) -> str:
    return f"{r['k']}/{r['n']} ({r['share']:.1%}; {r['wilson95'][0]:.1%}–{r['wilson95'][1]:.1%})"


def evaluate_candidates(
    predictions: dict[str, Prediction],
    photos: pd.DataFrame,
    val: pd.DataFrame,
    model_version: str,
    args: argparse.Namespace,
) -> tuple[list[dict[str, Any]], dict[str, OodGate]]:
    """Scores, thresholds and rates of every candidate; the fitted gates by name."""
    halves = {half: (photos["half"] == half).to_numpy() for half in HALVES}
    results, gates = [], {}
    for candidate in CANDIDATES:
        start = time.perf_counter()
        if candidate.method is not None:
            gate = fit_ood_features(
                predictions["val"].features,
                candidate.method,
                model_version=model_version,
                tta=args.tta,
                labels=val["dx"].tolist(),
                groups=val["lesion_id"].tolist(),
                quantile=args.quantile,
                folds=args.folds,
                k=candidate.k,
            )
            gates[candidate.name] = gate
            val_scores, threshold = gate.validation_scores, gate.threshold
            score = gate.score
            scores = {part: score(predictions[part].features) for part in ("test", "photos")}
        else:
            val_scores = candidate.baseline(predictions["val"])
            threshold = quantile_threshold(val_scores, args.quantile)
            scores = {part: candidate.baseline(predictions[part]) for part in ("test", "photos")}
        refused = scores["photos"] > threshold
        results.append(
            {
                "name": candidate.name,
                "feature_space": candidate.method is not None,
                "onnx": candidate.onnx,
                "threshold": threshold,
                "fit_seconds": round(time.perf_counter() - start, 2),
                "val_refused": rate(val_scores > threshold),
                "choose": {
                    "photos_refused": rate(refused[halves["choose"]]),
                    "auroc_vs_val": ood_auroc(val_scores, scores["photos"][halves["choose"]]),
                },
                "report": {
                    "photos_refused": rate(refused[halves["report"]]),
                    "auroc_vs_test": ood_auroc(scores["test"], scores["photos"][halves["report"]]),
                    "scenes_all_refused": _scenes_refused(photos[halves["report"]], refused[halves["report"]]),
                },
                "test_refused": rate(scores["test"] > threshold),
                "photo_scores": [float(s) for s in scores["photos"]],
            }
        )
    return results, gates


def _scenes_refused(photos: pd.DataFrame, refused: np.ndarray) -> dict[str, Any]:
    """Per scene (a photo and its crops): refused only when every image of it is: the count for independent units."""
    per_scene = pd.Series(refused, index=photos["scene"].to_numpy()).groupby(level=0).all()
    return rate(per_scene.to_numpy())


def choose(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The feature-space candidate refusing the most choose-half photos, then the higher AUROC, then listed first."""
    eligible = [(i, r) for i, r in enumerate(results) if r["feature_space"]]
    _, best = max(
        eligible,
        key=lambda item: (item[1]["choose"]["photos_refused"]["share"], item[1]["choose"]["auroc_vs_val"], -item[0]),
    )
    return best


def image_check_refusals(paths: Sequence[str]) -> np.ndarray:
    """Today's model-free image check (lesionnet.inference.decision.image_check) on each file: True = refused."""
    return np.array([not check_image(read_rgb(p)).passed for p in paths], dtype=bool)


def markdown(results: list[dict[str, Any]], chosen: str) -> str:
    """One row per candidate; the chosen one marked."""
    rows = [
        {
            "score": f"**{r['name']}** (chosen)" if r["name"] == chosen else r["name"],
            "choose half: photos refused": fmt_rate(r["choose"]["photos_refused"]),
            "choose AUROC": f"{r['choose']['auroc_vs_val']:.3f}",
            "report half: photos refused": fmt_rate(r["report"]["photos_refused"]),
            "report scenes (all crops) refused": fmt_rate(r["report"]["scenes_all_refused"]),
            "test lesions refused": fmt_rate(r["test_refused"]),
            "report AUROC": f"{r['report']['auroc_vs_test']:.3f}",
        }
        for r in results
    ]
    return pd.DataFrame(rows).to_markdown(index=False)


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    run = RunFolder(args.run)
    ckpt = args.ckpt or run.best_checkpoint()
    photos = load_photos(args.photos)
    val = sample_split(run, "val", args.data_root, args.max_val, args.seed)
    test = sample_split(run, "test", args.data_root, args.max_test, args.seed)
    predictor = Predictor(load_members([str(ckpt)], device=args.device), tta=args.tta)
    start = time.perf_counter()
    predictions = {
        "val": predictor.predict_paths(val["path"].tolist(), batch_size=args.batch_size, desc="val"),
        "test": predictor.predict_paths(test["path"].tolist(), batch_size=args.batch_size, desc="test"),
        "photos": predictor.predict_paths(photos["path"].tolist(), batch_size=args.batch_size, desc="photos"),
    }
    predict_seconds = time.perf_counter() - start
    results, gates = evaluate_candidates(predictions, photos, val, predictor.version, args)
    chosen = choose(results)
    refused_by_gate = np.asarray(chosen["photo_scores"]) > chosen["threshold"]
    checked = image_check_refusals(photos["path"].tolist())
    report_half = (photos["half"] == "report").to_numpy()
    test_checked = image_check_refusals(test["path"].tolist())
    photos = photos.assign(gate_refuses=refused_by_gate, image_check_refuses=checked)
    summary = {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]) if argv is None else list(argv),
        "commit": git_commit(),
        "python": platform.python_version(),
        "checkpoint": str(ckpt),
        "model_version": predictor.version,
        "feature_dim": int(predictions["val"].features.shape[1]),
        "quantile": args.quantile,
        "n_val": len(val),
        "n_val_lesions": int(val["lesion_id"].nunique()),
        "n_test": len(test),
        "n_photos": {half: int((photos["half"] == half).sum()) for half in HALVES},
        "predict_seconds": round(predict_seconds, 1),
        "chosen": chosen["name"],
        "candidates": results,
        "image_check": {
            "report_photos_refused": rate(checked[report_half]),
            "report_photos_refused_with_gate": rate((checked | refused_by_gate)[report_half]),
            "test_refused": rate(test_checked),
        },
        "photos": photos.drop(columns=["path", "phash"], errors="ignore").to_dict(orient="records"),
    }
    print(
        f"{predictor.version}: {len(val)} validation images ({summary['n_val_lesions']} lesions), {len(test)} test "
        f"images, photos {summary['n_photos']}; threshold = {args.quantile:.0%} quantile of out-of-sample "
        "validation scores\n"
    )
    print(markdown(results, chosen["name"]))
    check = summary["image_check"]
    print(
        f"\nchosen: {chosen['name']}. Report half: image check alone refuses "
        f"{fmt_rate(check['report_photos_refused'])} photos, "
        f"with the gate {fmt_rate(check['report_photos_refused_with_gate'])}; "
        f"image check on test lesions: {fmt_rate(check['test_refused'])}."
    )
    missed = photos[report_half & ~refused_by_gate]["name"].tolist()
    print(f"report-half photos the chosen gate lets through: {missed or 'none'}")
    if args.gate_out is not None:
        print(f"chosen gate saved to {gates[chosen['name']].save(args.gate_out)}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2, default=str))
        print(f"all numbers in {args.json}")
    return summary


if __name__ == "__main__":
    main()
