"""The app's two questions, measured: "is this a dermatoscope image?" (refuse only what is not) and "is this lesion
unlike the ones I learnt?" (flag and refer, never refuse). Fit and choose on one half of each outside set, report on
the other.

    python scripts/build_ood_photos.py                                   # -> logs/ood_photos/ (once)
    python bench/image_type_eval.py --run <run> --scores <eval run>/scores.json \\
        --data-root ../shared/data/ham10000_200x150 --json image_type.json --gate-out <folder>

Sets (features of the run's checkpoint, one pass each; ``--cache`` keeps them in an .npz):
- dermatoscope images: the run's validation split (fits the familiarity score and the confidence gate, as the app
  does), its test split (report only), Derm7pt (another clinic; halves by case: ``d7_X`` and ``d7_Xbis`` together);
- other images: the package photos of scripts/build_ood_photos.py (its halves, by scene) and the smartphone photos of
  ``../shared/data/phone_photos`` (halves by patient: ``PAT_<patient>_...``).
Nothing of the "report" halves or the test split is used to fit or choose.

Question 1 (``lesionnet.inference.decision.image_type``): a logistic regression on the stage statistics, positives =
validation + Derm7pt "choose", negatives = package + phone photos "choose"; for each ridge penalty of ``--l2`` the
threshold passes ``--pass-rate`` of the positives out of fold (grouped by lesion / case / patient / scene); chosen:
the penalty refusing the most negatives out of fold. Reported: share passed of test and Derm7pt "report", share
refused of phone "report" and package "report", Wilson 95% intervals.

Question 2 (the familiarity flag, ``lesionnet.inference.decision.ood`` Mahalanobis on validation): never refuses; a
flagged image is answered "unsure, have it checked" with urgency see_dermatologist, like every "unsure". Its
threshold quantile (``--quantiles``) is chosen on Derm7pt "choose": the most flags that keep >= ``--answered`` of
images answered with a class. The whole policy (image check, question 1, confidence gate, referral threshold of
``--scores``, familiarity) is then reported on Derm7pt "report" and the test split: images answered with a class,
flagged, unsure, refused, and melanomas referred (referral, flag or unsure) over all melanomas.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionnet.contract.scores import read_scores
from lesionnet.data.run_folder import RunFolder
from lesionnet.evaluation.external_sets import external_table
from lesionnet.evaluation.metrics.operating_points import threshold_for_sensitivity
from lesionnet.inference import Predictor, load_members, read_rgb
from lesionnet.inference.decision.image_check import check_image
from lesionnet.inference.decision.image_type import ImageTypeGate, fit_image_type, out_of_fold_logits
from lesionnet.inference.decision.ood import OodGate, fit_ood_features, wilson_interval
from lesionnet.inference.decision.policy import ConfidenceGate, ReferralPolicy

HALVES = ("choose", "report")


@dataclass
class ImageSet:
    """One set's images, labels (dx or None), groups (lesion / case / patient / scene), halves and features."""

    name: str
    table: pd.DataFrame  # path, dx (optional), group, half
    features: np.ndarray | None = None  # pooled last features: the familiarity score
    stage_stats: np.ndarray | None = None  # stage statistics: the image-type gate
    probs: np.ndarray | None = None
    msp: np.ndarray | None = None
    checked: np.ndarray | None = None  # passed the image check


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="train.py run folder (split.csv, checkpoints/)")
    parser.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: the run's best)")
    parser.add_argument("--scores", type=Path, default=None, help="evaluate.py's scores.json: the referral rule")
    parser.add_argument("--data-root", type=Path, default=None, help="the run's data (default: its metrics.json)")
    parser.add_argument("--derm7pt", type=Path, default=Path("../shared/data/derm7pt"))
    parser.add_argument("--phone", type=Path, default=Path("../shared/data/phone_photos"))
    parser.add_argument("--photos", type=Path, default=Path("logs/ood_photos"), help="scripts/build_ood_photos.py")
    parser.add_argument("--l2", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3])
    parser.add_argument("--pass-rate", type=float, default=0.99, help="of dermatoscope images, out of fold")
    parser.add_argument("--quantiles", type=float, nargs="+", default=[0.95, 0.975, 0.99, 0.995, 0.999])
    parser.add_argument("--answered", type=float, default=0.80, help="share of images to answer with a class")
    parser.add_argument("--confidence-quantile", type=float, default=0.05, help="the app's unsure.quantile")
    parser.add_argument(
        "--referral-targets",
        type=float,
        nargs="*",
        default=[0.95, 0.97, 0.98, 0.99],
        help="melanoma sensitivities to set the referral threshold for on validation: the trade-off, reported only",
    )
    parser.add_argument(
        "--ood-method", default="mahalanobis_class", help="the familiarity score (serve.yaml ood.method)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cache", type=Path, default=None, help="features .npz (written once, then read)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--gate-out", type=Path, default=None, help="folder: image_type_gate.json, ood_gate.json")
    return parser.parse_args(argv)


def half_of(key: str) -> str:
    """A stable half from a group key (sha256 parity): the same case or patient always lands in the same half."""
    return HALVES[hashlib.sha256(key.encode()).digest()[0] % 2]


def derm7pt_table(folder: Path, class_names: Sequence[str]) -> pd.DataFrame:
    table = external_table(folder / "images", folder / "labels.csv", class_names)
    table["group"] = table["image_id"].str.replace(r"bis$", "", regex=True)  # two images of one case together
    table["half"] = table["group"].map(half_of)
    return table


def phone_table(folder: Path, class_names: Sequence[str]) -> pd.DataFrame:
    table = external_table(folder / "images", folder / "labels.csv", class_names)
    table["group"] = table["image_id"].str.split("_").str[1]  # PAT_<patient>_<lesion>_<image>
    table["half"] = table["group"].map(half_of)
    return table


def package_table(folder: Path) -> pd.DataFrame:
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"No {manifest}: build it first (python scripts/build_ood_photos.py --out {folder}).")
    photos = pd.read_csv(manifest)
    return pd.DataFrame(
        {"path": [str(folder / "images" / n) for n in photos["name"]], "group": photos["scene"], "half": photos["half"]}
    )


def load_sets(args: argparse.Namespace, run: RunFolder, class_names: Sequence[str]) -> dict[str, ImageSet]:
    sets = {}
    for split in ("val", "test"):
        table = run.split_table(split, args.data_root)
        sets[split] = ImageSet(split, table.assign(group=table["lesion_id"], half=split))
    sets["derm7pt"] = ImageSet("derm7pt", derm7pt_table(args.derm7pt, class_names))
    sets["phone"] = ImageSet("phone", phone_table(args.phone, class_names))
    sets["package"] = ImageSet("package", package_table(args.photos))
    return sets


def predict_sets(sets: dict[str, ImageSet], predictor: Predictor, args: argparse.Namespace) -> None:
    """Features, probabilities and image checks of every set; from ``--cache`` when it holds them for this very model
    (the cache records the predictor's version: another checkpoint's features are computed again, not reused)."""
    cached = dict(np.load(args.cache, allow_pickle=False)) if args.cache and args.cache.is_file() else {}
    if cached and str(cached.get("model_version", "")) != predictor.version:
        print(f"{args.cache} holds another model's features: computing them again", file=sys.stderr, flush=True)
        cached = {}
    for name, image_set in sets.items():
        paths = image_set.table["path"].tolist()
        if f"{name}_stage_stats" in cached and len(cached[f"{name}_features"]) == len(paths):
            image_set.features, image_set.probs = cached[f"{name}_features"], cached[f"{name}_probs"]
            image_set.stage_stats = cached[f"{name}_stage_stats"]
            image_set.msp, image_set.checked = cached[f"{name}_msp"], cached[f"{name}_checked"]
            continue
        prediction = predictor.predict_paths(paths, batch_size=args.batch_size, desc=name)
        image_set.features, image_set.probs, image_set.msp = prediction.features, prediction.probs, prediction.msp
        if prediction.stage_stats is None:
            raise SystemExit("The checkpoint's network has no stages: the image-type gate needs a timm backbone.")
        image_set.stage_stats = prediction.stage_stats
        image_set.checked = np.array([check_image(read_rgb(p)).passed for p in paths])
        print(f"predicted {name}: {len(paths)} images", file=sys.stderr, flush=True)
    if args.cache and not cached:
        arrays: dict[str, Any] = {"model_version": np.array(predictor.version)}
        for name, s in sets.items():
            arrays |= {f"{name}_features": s.features, f"{name}_probs": s.probs, f"{name}_msp": s.msp}
            arrays[f"{name}_stage_stats"] = s.stage_stats
            arrays[f"{name}_checked"] = s.checked
        np.savez(args.cache, **arrays)


def rate(flags: np.ndarray) -> dict[str, Any]:
    k, n = int(np.sum(flags)), len(flags)
    low, high = wilson_interval(k, n) if n else (float("nan"), float("nan"))
    return {"k": k, "n": n, "share": k / n if n else float("nan"), "wilson95": [low, high]}


def fmt(r: dict[str, Any]) -> str:
    return f"{r['k']}/{r['n']} ({r['share']:.1%}; {r['wilson95'][0]:.1%}–{r['wilson95'][1]:.1%})"


def part(image_set: ImageSet, half: str | None) -> np.ndarray:
    """Row mask of one half (None: all rows)."""
    return np.ones(len(image_set.table), bool) if half is None else (image_set.table["half"] == half).to_numpy()


def question1_data(sets: dict[str, ImageSet]) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, int]]:
    """Fitting data: validation + Derm7pt "choose" (label 1), package + phone "choose" (label 0)."""
    chosen = [("val", None, 1), ("derm7pt", "choose", 1), ("package", "choose", 0), ("phone", "choose", 0)]
    features, labels, groups, counts = [], [], [], {}
    for name, half, label in chosen:
        s, mask = sets[name], part(sets[name], half)
        assert s.stage_stats is not None
        features.append(s.stage_stats[mask])
        labels += [label] * int(mask.sum())
        groups += [f"{name}:{g}" for g in s.table.loc[mask, "group"]]
        counts[f"{name}" + (f" {half}" if half else "")] = int(mask.sum())
    return np.concatenate(features), np.array(labels), groups, counts


def choose_image_type(sets: dict[str, ImageSet], args: argparse.Namespace, version: str) -> tuple[Any, list[dict]]:
    """Each penalty's out-of-fold trade-off on the fitting data; the gate of the one refusing the most negatives."""
    x, y, groups, counts = question1_data(sets)
    trials = []
    for l2 in args.l2:
        oof = out_of_fold_logits(x, y, groups, l2=l2)
        threshold = float(np.quantile(oof[y == 1], 1 - args.pass_rate))
        trials.append({"l2": l2, "oof_negatives_refused": float(np.mean(oof[y == 0] < threshold))})
    best = max(trials, key=lambda t: (t["oof_negatives_refused"], -t["l2"]))
    gate = fit_image_type(x, y, groups, version, "none", args.pass_rate, best["l2"], counts=counts)
    return gate, trials


@dataclass
class Outcome:
    """What the app does with each image of a set (boolean masks)."""

    refused: np.ndarray  # image check or question 1: no answer
    unsure: np.ndarray  # confidence gate (not refused)
    flagged: np.ndarray  # familiarity flag (not refused)
    referred: np.ndarray  # the referral rule fires (not refused)

    @property
    def answered(self) -> np.ndarray:
        """Answered with a class: not refused, not unsure, not flagged."""
        return ~self.refused & ~self.unsure & ~self.flagged

    @property
    def sent_to_doctor(self) -> np.ndarray:
        return ~self.refused & (self.referred | self.unsure | self.flagged)


@dataclass(frozen=True)
class AppPolicy:
    """The app's decisions as the bench replays them: question 1, the familiarity flag, the confidence gate and the
    referral rule."""

    image_type: ImageTypeGate
    familiarity: OodGate
    flag_threshold: float
    msp_threshold: float
    referral: ReferralPolicy
    class_names: Sequence[str]


def outcome(s: ImageSet, policy: AppPolicy) -> Outcome:
    assert s.features is not None and s.probs is not None and s.msp is not None and s.checked is not None
    assert s.stage_stats is not None
    refused = ~s.checked | policy.image_type.refuses(s.stage_stats)
    flagged = ~refused & (policy.familiarity.score(s.features) > policy.flag_threshold)
    unsure = ~refused & (s.msp < policy.msp_threshold)
    referred = ~refused & np.array([policy.referral.assess(p, policy.class_names)["refer"] for p in s.probs])
    return Outcome(refused, unsure, flagged, referred)


def policy_row(s: ImageSet, o: Outcome, mask: np.ndarray) -> dict[str, Any]:
    mel = mask & (s.table["dx"] == "mel").to_numpy() if "dx" in s.table else np.zeros_like(mask)
    return {
        "answered": rate(o.answered[mask]),
        "flagged": rate(o.flagged[mask]),
        "unsure": rate((o.unsure & ~o.flagged)[mask]),
        "refused": rate(o.refused[mask]),
        "melanomas_sent_to_doctor": rate(o.sent_to_doctor[mel]) if mel.any() else None,
        "melanomas_refused": rate(o.refused[mel]) if mel.any() else None,
    }


def referral_trade_off(sets: dict[str, ImageSet], policy: AppPolicy, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The whole policy with the melanoma threshold set on validation for each of ``--referral-targets``: melanomas and
    nevi of Derm7pt sent to a doctor (what a stricter target costs; the chosen gates unchanged)."""
    val, derm = sets["val"], sets["derm7pt"]
    assert val.probs is not None
    class_names = list(policy.class_names)
    targets = np.array([class_names.index(d) for d in val.table["dx"]])
    dx = derm.table["dx"].to_numpy()
    rows = []
    for target in args.referral_targets:
        threshold = threshold_for_sensitivity(val.probs, targets, class_names.index("mel"), target)
        stricter = replace(policy.referral, melanoma_threshold=threshold, target_sensitivity=target)
        sent = outcome(derm, replace(policy, referral=stricter)).sent_to_doctor
        row: dict[str, Any] = {"target": target, "threshold": threshold}
        for half in HALVES:
            mask = part(derm, half)
            row[f"{half}_melanomas"] = rate(sent[mask & (dx == "mel")])
        row["report_nevi"] = rate(sent[part(derm, "report") & (dx == "nv")])
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = RunFolder(args.run)
    ckpt = args.ckpt or run.best_checkpoint()
    predictor = Predictor(load_members([str(ckpt)], device="cpu"))
    class_names = predictor.class_names
    sets = load_sets(args, run, class_names)
    predict_sets(sets, predictor, args)
    val = sets["val"]
    assert val.features is not None and val.msp is not None

    q1, trials = choose_image_type(sets, args, predictor.version)
    q1_report = {
        "test passed": rate(~q1.refuses(sets["test"].stage_stats)),
        "derm7pt report passed": rate(~q1.refuses(sets["derm7pt"].stage_stats[part(sets["derm7pt"], "report")])),
        "phone report refused": rate(q1.refuses(sets["phone"].stage_stats[part(sets["phone"], "report")])),
        "package report refused": rate(q1.refuses(sets["package"].stage_stats[part(sets["package"], "report")])),
        "derm7pt choose passed (fitted on)": rate(
            ~q1.refuses(sets["derm7pt"].stage_stats[part(sets["derm7pt"], "choose")])
        ),
        "phone choose refused (fitted on)": rate(q1.refuses(sets["phone"].stage_stats[part(sets["phone"], "choose")])),
    }

    ood = fit_ood_features(
        val.features,
        args.ood_method,
        model_version=predictor.version,
        labels=val.table["dx"].tolist(),
        groups=val.table["lesion_id"].tolist(),
        quantile=0.95,
    )
    msp_threshold = float(np.quantile(val.msp, args.confidence_quantile))
    scores_row = read_scores(args.scores).final_scores if args.scores else None
    policy = ReferralPolicy.from_scores(scores_row)
    derm = sets["derm7pt"]
    choose_mask, report_mask = part(derm, "choose"), part(derm, "report")
    familiarity = []
    for quantile in args.quantiles:
        threshold = float(np.quantile(ood.validation_scores, quantile))
        o = outcome(derm, AppPolicy(q1, ood, threshold, msp_threshold, policy, class_names))
        familiarity.append({"quantile": quantile, "threshold": threshold, **policy_row(derm, o, choose_mask)})
    meeting = [f for f in familiarity if f["answered"]["share"] >= args.answered]
    chosen = min(meeting, key=lambda f: f["quantile"]) if meeting else max(familiarity, key=lambda f: f["quantile"])
    app = AppPolicy(q1, ood, chosen["threshold"], msp_threshold, policy, class_names)
    o_derm, o_test = outcome(derm, app), outcome(sets["test"], app)
    trade_off = referral_trade_off(sets, app, args)
    report = {
        "derm7pt report": policy_row(derm, o_derm, report_mask),
        "derm7pt all": policy_row(derm, o_derm, np.ones_like(report_mask)),
        "test": policy_row(sets["test"], o_test, np.ones(len(sets["test"].table), bool)),
    }

    print("## Question 1: is this a dermatoscope image?\n")
    print("| l2 | negatives refused out of fold (choose halves) |\n|---|---|")
    for t in trials:
        print(f"| {t['l2']:g} | {t['oof_negatives_refused']:.1%} |")
    print(f"\nchosen l2 {q1.l2:g}, threshold {q1.threshold:.3f} (passes {args.pass_rate:.1%} out of fold)\n")
    print("| set | share (Wilson 95%) |\n|---|---|")
    for name, r in q1_report.items():
        print(f"| {name} | {fmt(r)} |")
    print("\n## Question 2 and the whole policy (familiarity quantile chosen on Derm7pt 'choose')\n")
    print("| quantile | answered | flagged | unsure | refused | melanomas to a doctor |\n|---|---|---|---|---|---|")
    for f in familiarity:
        mel = fmt(f["melanomas_sent_to_doctor"]) if f["melanomas_sent_to_doctor"] else "-"
        print(
            f"| {f['quantile']} | {fmt(f['answered'])} | {fmt(f['flagged'])} | {fmt(f['unsure'])} | "
            f"{fmt(f['refused'])} | {mel} |"
        )
    print(f"\nchosen quantile {chosen['quantile']}\n")
    print("| set | answered | flagged | unsure | refused | melanomas to a doctor | melanomas refused |")
    print("|---|---|---|---|---|---|---|")
    for name, r in report.items():
        mel = fmt(r["melanomas_sent_to_doctor"]) if r["melanomas_sent_to_doctor"] else "-"
        mel_refused = fmt(r["melanomas_refused"]) if r["melanomas_refused"] else "-"
        print(
            f"| {name} | {fmt(r['answered'])} | {fmt(r['flagged'])} | {fmt(r['unsure'])} | {fmt(r['refused'])} "
            f"| {mel} | {mel_refused} |"
        )

    print("\n## The referral target's trade-off (threshold on validation; the app keeps --scores' own)\n")
    print(
        "| val sensitivity target | threshold | Derm7pt choose: melanomas to a doctor | Derm7pt report: melanomas to a "
        "doctor | Derm7pt report: nevi to a doctor |\n|---|---|---|---|---|"
    )
    for t in trade_off:
        print(
            f"| {t['target']} | {t['threshold']:.4f} | {fmt(t['choose_melanomas'])} | {fmt(t['report_melanomas'])} | "
            f"{fmt(t['report_nevi'])} |"
        )
    if args.gate_out:
        args.gate_out.mkdir(parents=True, exist_ok=True)
        q1.save(args.gate_out / "image_type_gate.json")
        replace(ood, threshold=chosen["threshold"], quantile=chosen["quantile"]).save(args.gate_out / "ood_gate.json")
        ConfidenceGate(
            method="msp",
            threshold=msp_threshold,
            source=f"{args.confidence_quantile:.0%} quantile of {len(val.msp)} validation images",
            model_version=predictor.version,
            fit={"n_images": len(val.msp), "quantile": args.confidence_quantile},
        ).save(args.gate_out / "confidence_gate.json")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "command": " ".join(sys.argv),
                    "checkpoint": str(ckpt),
                    "model_version": predictor.version,
                    "question1": {
                        "trials": trials,
                        "l2": q1.l2,
                        "threshold": q1.threshold,
                        "fit": q1.fit,
                        "report": q1_report,
                    },
                    "referral_trade_off": trade_off,
                    "question2": {
                        "candidates": familiarity,
                        "chosen_quantile": chosen["quantile"],
                        "report": report,
                        "msp_threshold": msp_threshold,
                        "referral": policy.source,
                    },
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
