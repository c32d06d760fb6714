"""One image in, one answer out, and the model card.

An image goes: image check (blank, synthetic, broken) -> model -> question 1, "is this a dermatoscope image?"
(``ImageTypeGate``: the only model-based refusal) -> question 2, "is this lesion unlike the ones the model learnt?"
(the familiarity score, ``OodGate``: never refuses, sends to a doctor) -> confidence gate ("unsure": sends to a
doctor too) -> referral rule -> heatmap.

No HTTP here, so the logic can be tested and reused (a CLI, a batch job) without a server.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import numpy as np

from lesionnet.app import content
from lesionnet.classes import MALIGNANT
from lesionnet.contract.files import ContractError
from lesionnet.contract.run import RunMetrics
from lesionnet.contract.scores import ScoresFile, ScoresRow
from lesionnet.data.metadata import embedded_sample_root
from lesionnet.inference import Member, Predictor
from lesionnet.inference.decision.image_check import CheckThresholds, check_image, thresholds_dict
from lesionnet.inference.decision.image_type import ImageTypeGate
from lesionnet.inference.decision.ood import OodGate
from lesionnet.inference.decision.policy import ConfidenceGate, ReferralPolicy
from lesionnet.inference.explain import GradCamExplainer, cam_heatmap

log = logging.getLogger(__name__)
DEMO_MAX_TRAIN_IMAGES = 1_000  # the full HAM10000 lesion-level split trains on ~7,000 images, the sample on ~200
SPLIT_ORDER = ("train", "val", "test")


def in_split_order(counts: dict[str, int]) -> dict[str, int]:
    """train, val, test first, then any other split name."""
    return dict(sorted(counts.items(), key=lambda kv: (SPLIT_ORDER.index(kv[0]) if kv[0] in SPLIT_ORDER else 9, kv[0])))


def run_metrics(member: Member) -> RunMetrics | None:
    """The metrics.json of the run a checkpoint sits in; None for a copied checkpoint or an unreadable file."""
    if member.run is None or not member.run.metrics_file.is_file():
        return None
    try:
        return member.run.metrics()
    except ContractError as err:  # e.g. written by another LesionNet version: the card says "unknown" instead
        log.warning("Model card without the run's metrics.json: %s", err)
        return None


def split_record(data: dict[str, Any]) -> dict[str, Any]:
    """How a run split its images, from the ``data`` node of its resolved config (metrics.json)."""
    split_file = Path(data["split_file"]).name if data.get("split_file") else None
    method = "file" if split_file else str(data.get("split", "lesion"))
    seed = data.get("split_seed")
    fractions = data.get("split_fractions") if method == "lesion" else None
    return {
        "method": method,
        "seed": seed,
        "fractions": fractions,
        "split_file": split_file,
        "description": content.split_description(method, seed, fractions, split_file),
    }


def demo_reason(embedded_sample: bool, train_images: int | None) -> str | None:
    """Why a checkpoint counts as a demo model, or None. Either of two signals suffices, so neither has to be present:

    - its run's data root is ``embedded_sample_root()`` (from the run's metrics.json: only while the checkpoint sits
      in its run folder);
    - it records fewer than ``DEMO_MAX_TRAIN_IMAGES`` training images (from the checkpoint's own provenance, else the
      run's counts: survives copying the .ckpt, and catches a copy of the sample in another folder).

    A checkpoint with neither record (copied out of its run and older than provenance) is not called a demo; its
    card says that its training data is unknown.
    """
    if embedded_sample:
        return content.DEMO_SAMPLE_ROOT
    if train_images is not None and train_images < DEMO_MAX_TRAIN_IMAGES:
        return content.demo_few_images(train_images)
    return None


def member_training(member: Member) -> dict[str, Any]:
    """What one checkpoint was trained on (``schemas.MemberTraining``): train/val counts and lesions from its
    provenance (stored in the .ckpt), test counts, the data root and the split settings from its run's metrics.json."""
    images: dict[str, int] = {}
    lesions, sources = None, []
    metrics = run_metrics(member)
    if metrics is not None:
        images.update(metrics.split_images)
        sources.append("run metrics.json")
    if member.provenance is not None:  # the checkpoint's own record wins for the splits it covers
        prov = member.provenance
        images.update(Counter(prov.split))
        lesions = in_split_order(Counter(split for split, _ in set(zip(prov.split, prov.lesion_id, strict=True))))
        sources.insert(0, "checkpoint provenance")
    images = in_split_order(images)
    root = Path(metrics.data_root) if metrics is not None else None
    embedded = root is not None and root.resolve() == embedded_sample_root().resolve()
    return {
        "name": member.name,
        "images": images,
        "lesions": lesions,
        "sources": sources,
        "data_root": root.name if root is not None else None,
        "embedded_sample": embedded,
        "split": split_record(metrics.config.get("data") or {}) if metrics is not None else None,
        "demo_reason": demo_reason(embedded, images.get("train")),
    }


def training_data(members: list[Member]) -> dict[str, Any]:
    """The model card's ``training_data`` (``schemas.TrainingData``): per checkpoint, and whether it is a demo."""
    records = [member_training(m) for m in members]
    sentences = [
        content.training_sentence(
            r["images"], r["data_root"], r["embedded_sample"], r["split"]["description"] if r["split"] else None
        )
        for r in records
    ]
    summary = (
        sentences[0]
        if len(records) == 1
        else " ".join(f"{r['name']}: {t}" for r, t in zip(records, sentences, strict=True))
    )
    demo = [r for r in records if r["demo_reason"]]
    return {
        "summary": summary,
        "dataset": content.DATASET,
        "demo_model": bool(demo),
        "demo_notice": content.demo_notice(demo[0]["images"].get("train")) if demo else None,
        "members": records,
    }


@dataclass
class LesionService:
    predictor: Predictor
    referral: ReferralPolicy = field(default_factory=ReferralPolicy)
    gate: ConfidenceGate = field(default_factory=ConfidenceGate)
    check: CheckThresholds = field(default_factory=CheckThresholds)
    ood: OodGate | None = None  # the familiarity score: an unfamiliar lesion is flagged, never refused (None: off)
    image_type: ImageTypeGate | None = None  # "is this a dermatoscope image?": refuses what is not (None: off)
    gradcam: bool = True
    scores: ScoresRow | None = None  # evaluate.py's scores of the served model, for the model card
    evaluated: ScoresFile | None = None  # what those scores were computed on

    def __post_init__(self) -> None:
        # The first member is explained (members may differ in input size): by its class activation map, which the
        # forward pass gives for free when the head is average-pool + linear, else by Grad-CAM (a backward pass).
        member = self.predictor.members[0]
        self.use_cam = self.gradcam and self.predictor.cam_available
        self.explainer = (
            GradCamExplainer(member.model, member.data_config) if self.gradcam and not self.use_cam else None
        )

    def class_info(self) -> list[dict[str, Any]]:
        """Each class in the model's order, in words (the model card's and the on-device page's list)."""
        return [
            {
                "code": c,
                "name": content.plain_name(c),
                "description": content.description(c),
                "malignant": c in MALIGNANT,
            }
            for c in self.predictor.class_names
        ]

    def _classes(self, probs: np.ndarray) -> list[dict[str, Any]]:
        rows = [{**info, "probability": round(float(p), 4)} for info, p in zip(self.class_info(), probs, strict=True)]
        return sorted(rows, key=lambda r: -r["probability"])

    def analyse(self, image: np.ndarray) -> dict[str, Any]:
        """The full API answer for one RGB uint8 image (status ok | unsure | rejected); its shape is
        ``schemas.PredictResponse``."""
        answer: dict[str, Any] = {
            "model_version": self.predictor.version,
            "demo_model": self.demo_model,
            "disclaimer": content.DISCLAIMER,
        }
        checked = check_image(image, self.check)
        answer["image_check"] = asdict(checked)
        rejected = {
            **answer,
            "status": "rejected",
            "message": content.MESSAGES["rejected"],
            "top_class": None,
            "probabilities": [],
            "urgency": {"refer": None, "reasons": [], "level": "unknown", "message": content.MESSAGES["rejected"]},
            "referral_check": self.referral_check(),
            "confidence": None,
            "heatmap": None,
            "image_type": None,
            "familiarity": None,
        }
        if not checked.passed:
            return rejected
        with self.predictor.lock:  # Grad-CAM hooks live on the shared modules
            out = self.predictor.predict_arrays([image], cams=self.use_cam).image(0)
            image_type = self.image_type_answer(out.stage_stats)
            if image_type is not None and not image_type["dermoscopy"]:  # question 1: not a dermatoscope image
                message = content.MESSAGES["not_dermoscopy"]
                return {
                    **rejected,
                    "message": message,
                    "image_type": image_type,
                    "urgency": {**rejected["urgency"], "message": message, "reasons": [content.NOT_DERMOSCOPY_REASON]},
                }
            familiarity = self.familiarity_answer(out.features)
            unfamiliar = familiarity is not None and not familiarity["familiar"]
            urgency = self.referral.assess(out.probs, self.predictor.class_names)
            unconfident = self.gate.unsure(out)
            classes = self._classes(self.referral.calibrate(out.probs))  # the shown percentages, highest first
            top = int(np.argmax(out.probs))  # the decision: the served probabilities, not the shown ones
            code = self.predictor.class_names[top]
            decided = next(c for c in classes if c["code"] == code)
            named = content.MOST_LIKELY if decided["probability"] >= classes[0]["probability"] else content.DECIDED
            config = self.predictor.members[0].data_config
            heatmap = None
            if self.use_cam:
                cams = cast(np.ndarray, out.cams)  # predicted with cams=self.use_cam
                heatmap = asdict(cam_heatmap(cams, top, code, config, image))
            elif self.explainer is not None:
                x = self.predictor.preprocess(0, [image])
                heatmap = asdict(self.explainer.explain(image, x, top, code))
        reasons = list(urgency["reasons"])  # question 2 and the confidence gate send to a doctor too: never reassure
        if unfamiliar:
            reasons.append(content.unfamiliar_reason(self.ood.quantile if self.ood is not None else 0.95))
        if unconfident:
            reasons.append(content.unsure_reason(f"{self.gate.score(out):.2f}", self.gate.threshold, self.gate.source))
        unsure = unfamiliar or unconfident
        if unfamiliar:
            message = content.MESSAGES["unfamiliar"]
        elif unconfident:
            message = content.MESSAGES["unsure"]
        else:
            message = named.format(name=decided["name"])
        level = "see_dermatologist" if reasons else "routine"
        urgency = {
            **urgency,
            "refer": bool(reasons),
            "reasons": reasons,
            "level": level,
            "message": content.MESSAGES["refer"]
            if urgency["refer"]
            else message
            if unsure
            else content.MESSAGES["routine"],
        }
        return {
            **answer,
            "status": "unsure" if unsure else "ok",
            "message": message,
            "top_class": None if unsure else decided,
            "probabilities": classes,
            "urgency": urgency,
            "referral_check": self.referral_check(),
            "confidence": {
                "method": self.gate.method,
                "score": round(self.gate.score(out), 4),
                "threshold": round(self.gate.threshold, 4),
                "threshold_source": self.gate.source,
            },
            "heatmap": heatmap,
            "image_type": image_type,
            "familiarity": familiarity,
        }

    def image_type_answer(self, stage_stats: np.ndarray | None) -> dict[str, Any] | None:
        """Question 1 on one image's stage statistics: is it a dermatoscope image? (None when the gate is off.)"""
        if self.image_type is None:
            return None
        if stage_stats is None:
            raise ValueError(
                f"{self.predictor.members[0].name} gives no stage statistics (not a timm backbone with stages): the "
                "image-type gate cannot read it. Serve it without image_type.gate_file."
            )
        score = self.image_type.score(stage_stats[None])
        return {
            "dermoscopy": not bool(self.image_type.refuses_score(score)[0]),
            "score": round(float(score[0]), 4),
            "threshold": round(self.image_type.threshold, 4),
            "source": self.image_type.source,
        }

    def familiarity_answer(self, features: np.ndarray) -> dict[str, Any] | None:
        """Question 2 on one image's pooled features: is the lesion like the ones the model learnt? (None: off.)"""
        if self.ood is None:
            return None
        score = self.ood.score(features[None])  # scored once: the percentile and the verdict come from it
        return {
            "familiar": not bool(self.ood.refuses_score(score)[0]),
            "method": self.ood.method,
            "score": round(float(score[0]), 4),
            "threshold": round(self.ood.threshold, 4),
            "percentile": round(float(self.ood.percentile_of(score)[0]), 4),
            "source": self.ood.source,
        }

    @cached_property
    def training(self) -> dict[str, Any]:
        """The model card's ``training_data``; read once (the checkpoints do not change while serving)."""
        return training_data(self.predictor.members)

    @property
    def demo_model(self) -> bool:
        return bool(self.training["demo_model"])

    def referral_check(self) -> dict[str, Any]:
        """Whether the referral rule was checked on held-out images (``schemas.ReferralCheck``): only a melanoma
        threshold chosen on validation and then scored by evaluate.py counts; the malignant-sum rule alone never."""
        scores, evaluated = self.scores, self.evaluated
        at_threshold = scores.at_val_threshold if scores is not None else None
        sensitivity = at_threshold.sensitivity if at_threshold is not None else None
        if self.referral.melanoma_threshold is None or sensitivity is None or scores is None or not evaluated:
            return {
                "validated": False,
                "message": content.REFERRAL_NOT_CHECKED,
                **dict.fromkeys(("evaluated_on", "n_images", "melanomas", "melanoma_sensitivity", "in_sample")),
            }
        melanoma = scores.per_class.get("mel")
        melanomas = melanoma.support if melanoma is not None else None
        return {
            "validated": True,
            "message": content.referral_checked(evaluated.n_images, melanomas, sensitivity, evaluated.in_sample),
            "evaluated_on": evaluated.evaluated,
            "n_images": evaluated.n_images,
            "melanomas": melanomas,
            "melanoma_sensitivity": sensitivity,
            "in_sample": evaluated.in_sample,
        }

    def _metrics(self) -> dict[str, Any] | None:
        """evaluate.py's figures of the served model (``schemas.Metrics``), or None when not evaluated."""
        s, evaluated = self.scores, self.evaluated
        if s is None or evaluated is None:
            return None
        served = {m.sha256 for m in self.predictor.members}
        return {
            "evaluated_on": evaluated.evaluated,
            "set": evaluated.set,
            "in_sample": evaluated.in_sample,
            "n_images": evaluated.n_images,
            "tta": evaluated.tta,
            "bootstrap": evaluated.bootstrap.model_dump() if evaluated.bootstrap else None,
            "provenance": {m.name: m.provenance for m in evaluated.models if m.sha256 in served},
            "accuracy": s.accuracy,
            "accuracy_ci95": s.ci95.get("accuracy"),
            "balanced_accuracy": s.balanced_accuracy,
            "balanced_accuracy_ci95": s.ci95.get("balanced_accuracy"),
            "macro_auroc": s.macro_auroc,
            "macro_f1": s.macro_f1,
            "melanoma": s.melanoma.model_dump() if s.melanoma else None,
            "temperature": s.temperature,
            "ece": s.ece,
            "ece_after_temperature": s.ece_after_temperature,
            "classwise_ece": s.classwise_ece,
            "brier": s.brier,
            "log_loss": s.log_loss,
            "shown_calibration": {"method": s.display.method, **s.displayed.model_dump()}
            if s.display is not None and s.displayed is not None
            else None,
            "per_class": {
                c: figures.model_dump(include={"recall", "precision", "auroc", "support"})
                for c, figures in s.per_class.items()
            },
        }

    def model_card(self) -> dict[str, Any]:
        """What the model is, what it was trained on, how well it did (with CIs when scores.json was given) and what
        it must not be used for; its shape is ``schemas.ModelCard``."""
        metrics = self._metrics()
        return {
            "name": "LesionNet",
            "model": self.predictor.describe(),
            "intended_use": content.INTENDED_USE,
            "not_a_diagnosis": content.DISCLAIMER,
            "training_data": self.training,
            "classes": self.class_info(),
            "metrics": metrics,
            "metrics_note": None if metrics else content.NOT_EVALUATED,
            "performance": content.performance_summary(
                self.scores, self.evaluated, list(metrics["provenance"].values())
            )
            if metrics and self.scores and self.evaluated
            else content.NOT_EVALUATED,
            "referral": asdict(self.referral),
            "referral_check": self.referral_check(),
            "unsure": {
                "method": self.gate.method,
                "threshold": self.gate.threshold,
                "source": self.gate.source,
                "fit": self.gate.fit,
            },
            "image_check": thresholds_dict(self.check),
            "limitations": list(content.LIMITATIONS),
        }
