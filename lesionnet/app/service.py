"""One image in, one answer out: image check -> model -> unsure gate -> referral -> Grad-CAM, and the model card.

No HTTP here, so the logic can be tested and reused (a CLI, a batch job) without a server.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lesionnet.app import content
from lesionnet.app.gradcam import CamExplainer
from lesionnet.app.image_check import CheckThresholds, check_image, thresholds_dict
from lesionnet.app.policy import ConfidenceGate, ReferralPolicy
from lesionnet.inference import Predictor


@dataclass
class LesionService:
    predictor: Predictor
    referral: ReferralPolicy = field(default_factory=ReferralPolicy)
    gate: ConfidenceGate = field(default_factory=ConfidenceGate)
    check: CheckThresholds = field(default_factory=CheckThresholds)
    gradcam: bool = True
    scores: dict[str, Any] | None = None  # evaluate.py's scores of the served model, for the model card
    evaluated: dict[str, Any] | None = None  # what those scores were computed on

    def __post_init__(self) -> None:
        member = self.predictor.members[0]  # Grad-CAM explains the first member (members may differ in input size)
        self.explainer = CamExplainer(member.model, member.data_config) if self.gradcam else None

    def _classes(self, probs: np.ndarray) -> list[dict[str, Any]]:
        rows = [
            {
                "code": c,
                "name": content.plain_name(c),
                "description": content.description(c),
                "malignant": c in content.MALIGNANT,
                "probability": round(float(p), 4),
            }
            for c, p in zip(self.predictor.class_names, probs, strict=True)
        ]
        return sorted(rows, key=lambda r: -r["probability"])

    def analyse(self, image: np.ndarray) -> dict[str, Any]:
        """The full API answer for one RGB uint8 image (status ok | unsure | rejected); its shape is
        ``schemas.PredictResponse``."""
        answer: dict[str, Any] = {"model_version": self.predictor.version, "disclaimer": content.DISCLAIMER}
        checked = check_image(image, self.check)
        answer["image_check"] = asdict(checked)
        if not checked.passed:
            return {
                **answer,
                "status": "rejected",
                "message": content.MESSAGES["rejected"],
                "top_class": None,
                "probabilities": [],
                "urgency": {"refer": None, "reasons": [], "level": "unknown", "message": content.MESSAGES["rejected"]},
                "confidence": None,
                "gradcam": None,
            }
        with self.predictor.lock:
            out = self.predictor.predict_arrays([image]).image(0)
            urgency = self.referral.assess(out.probs, self.predictor.class_names)
            unsure = self.gate.unsure(out)
            classes = self._classes(self.referral.calibrate(out.probs))
            cam = None
            if self.explainer is not None:
                x = self.predictor.preprocess(0, [image])
                cam = asdict(self.explainer.explain(image, x, int(np.argmax(out.probs))))
        if urgency["refer"]:
            level, message = "see_dermatologist", content.MESSAGES["refer"]
        elif unsure:  # never reassure when unsure
            level, message = "unknown", content.MESSAGES["unsure"]
        else:
            level, message = "routine", content.MESSAGES["routine"]
        urgency = {
            **urgency,
            "refer": True if urgency["refer"] else (None if unsure else False),
            "level": level,
            "message": message,
        }
        return {
            **answer,
            "status": "unsure" if unsure else "ok",
            "message": content.MESSAGES["unsure"] if unsure else f"Most likely: {classes[0]['name']}.",
            "top_class": None if unsure else classes[0],
            "probabilities": classes,
            "urgency": urgency,
            "confidence": {
                "method": self.gate.method,
                "score": round(self.gate.score(out), 4),
                "threshold": round(self.gate.threshold, 4),
                "threshold_source": self.gate.source,
            },
            "gradcam": cam,
        }

    def model_card(self) -> dict[str, Any]:
        """What the model is, how well it did (with CIs when scores.json was given) and what it must not be used for;
        its shape is ``schemas.ModelCard``."""
        metrics = None
        if self.scores:
            s = self.scores
            metrics = {
                "evaluated_on": (self.evaluated or {}).get("evaluated"),
                "n_images": (self.evaluated or {}).get("n_images"),
                "accuracy": s.get("accuracy"),
                "accuracy_ci95": (s.get("ci95") or {}).get("accuracy"),
                "balanced_accuracy": s.get("balanced_accuracy"),
                "balanced_accuracy_ci95": (s.get("ci95") or {}).get("balanced_accuracy"),
                "macro_auroc": s.get("macro_auroc"),
                "macro_f1": s.get("macro_f1"),
                "melanoma": s.get("melanoma"),
                "temperature": s.get("temperature"),
                "ece_after_temperature": s.get("ece_after_temperature"),
                "per_class": {
                    c: {k: v.get(k) for k in ("recall", "precision", "auroc", "support")}
                    for c, v in (s.get("per_class") or {}).items()
                },
            }
        return {
            "name": "LesionNet",
            "model": self.predictor.describe(),
            "intended_use": content.INTENDED_USE,
            "not_a_diagnosis": content.DISCLAIMER,
            "training_data": content.TRAINING_DATA,
            "classes": [
                {
                    "code": c,
                    "name": content.plain_name(c),
                    "description": content.description(c),
                    "malignant": c in content.MALIGNANT,
                }
                for c in self.predictor.class_names
            ],
            "metrics": metrics,
            "metrics_note": None if metrics else "No evaluate.py scores.json was given: performance is unknown.",
            "referral": asdict(self.referral),
            "unsure": {
                "method": self.gate.method,
                "threshold": self.gate.threshold,
                "source": self.gate.source,
                "fit": self.gate.fit,
            },
            "image_check": thresholds_dict(self.check),
            "limitations": list(content.LIMITATIONS),
        }
