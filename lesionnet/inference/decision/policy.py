"""The decisions on top of the probabilities: when to say "see a dermatologist" and when to say "unsure".

Referral: a lesion is flagged when P(melanoma) reaches the validation-chosen threshold from evaluate.py's
``scores.json`` (the largest threshold that still caught ``mel_target_sensitivity`` of validation melanomas), or
when the malignant classes together (mel + bcc + akiec) reach ``malignant_threshold``. Without a scores.json only
the second rule applies, at a default of 0.3: below one half on purpose, because missing a cancer costs more than
an unneeded visit; this default is NOT validated. Both rules use the raw ensemble probabilities, the ones the
threshold was chosen on; the display calibration (or, in older files, the temperature) from scores.json only
calibrates the probabilities that are displayed: a logit-adjusted model decides with its adjusted probabilities and
shows probabilities of the class mix.

Unsure: the max softmax probability (MSP, Hendrycks & Gimpel 2017) or the negative energy (logsumexp of the logits,
Liu et al. 2020) below a threshold set at a low quantile (default 5%) of its values on the training run's validation
images: about 5% of genuine validation lesions are answered "unsure" by design.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from lesionnet.classes import MALIGNANT
from lesionnet.contract.files import ContractError
from lesionnet.contract.gates import (
    REFIT_CONFIDENCE,
    ConfidenceGateFile,
    ConfidenceMethod,
    read_confidence_gate,
    write_confidence_gate,
)
from lesionnet.contract.scores import ScoresRow
from lesionnet.data.decode import read_rgb
from lesionnet.inference.decision.combine import apply_scaling, apply_temperature
from lesionnet.inference.decision.image_check import CheckThresholds, check_image

if TYPE_CHECKING:  # the core's outputs, read here; the core imports this package's combine (see __init__)
    from lesionnet.inference.predictor import ImageOutput, Prediction, Predictor

log = logging.getLogger(__name__)
DEFAULT_MSP_THRESHOLD = 0.4  # unvalidated fallback: below it no class has even 40%


# ----------------------------------------------------------------------------- referral


@dataclass(frozen=True)
class ReferralPolicy:
    malignant_threshold: float = 0.3
    melanoma_threshold: float | None = None
    target_sensitivity: float | None = None
    temperature: float = 1.0
    source: str = "default malignant-probability rule (not validated)"
    # The shown percentages: softmax(display_scale * log p + display_bias), the row's display calibration from
    # scores.json (``DisplayCalibration``, fitted on validation); None: softmax(log p / temperature).
    display_method: str = "temperature"
    display_scale: tuple[float, ...] | None = None
    display_bias: tuple[float, ...] | None = None

    @classmethod
    def from_scores(cls, scores: ScoresRow | None, malignant_threshold: float = 0.3) -> ReferralPolicy:
        """The rule evaluate.py measured for the served row: its validation melanoma threshold, temperature and the
        calibration of the shown percentages."""
        if scores is None:
            return cls(malignant_threshold=malignant_threshold)
        shown: dict[str, Any] = {"temperature": scores.temperature if scores.temperature is not None else 1.0}
        if scores.display is not None:
            shown |= {
                "display_method": scores.display.method,
                "display_scale": tuple(scores.display.scale),
                "display_bias": tuple(scores.display.bias),
            }
        at_threshold = scores.at_val_threshold
        if at_threshold is None or at_threshold.threshold is None:
            return cls(malignant_threshold=malignant_threshold, **shown)
        return cls(
            malignant_threshold=malignant_threshold,
            melanoma_threshold=at_threshold.threshold,
            target_sensitivity=at_threshold.target_sensitivity,
            source=f"melanoma threshold chosen on validation for {at_threshold.target_sensitivity} sensitivity "
            "(evaluate.py scores.json), plus the malignant-probability rule",
            **shown,
        )

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """The percentages shown: the display calibration evaluate.py fitted (softmax(scale * log p + bias)), else
        softmax(log p / T) with its temperature. Never what the rules or the top class are decided by."""
        if self.display_scale is not None and self.display_bias is not None:
            return apply_scaling(probs, self.display_scale, self.display_bias)
        return apply_temperature(probs, self.temperature)

    @property
    def _what(self) -> str:
        """How a rule's number is named: when the page shows calibrated percentages, the rules still compare the raw
        probabilities they were chosen on, so the answer must not call both "probability"."""
        if self.display_scale is not None and self.display_bias is not None:
            identity = all(a == 1.0 for a in self.display_scale) and all(b == 0.0 for b in self.display_bias)
        else:
            identity = self.temperature == 1.0
        return "probability" if identity else "raw score (before the calibration of the percentages)"

    def melanoma_reason(self, p_mel: str) -> str:
        """Why the melanoma rule refers, for a probability written as ``p_mel`` (the on-device page gets "{p}")."""
        return (
            f"Melanoma {self._what} {p_mel} is at or above {self.melanoma_threshold:.2f}, the level "
            f"set on validation images to catch {self.target_sensitivity:.0%} of melanomas."
        )

    def malignant_reason(self, p_malignant: str) -> str:
        return (
            f"The {self._what} of a skin cancer or pre-cancer (melanoma, basal cell carcinoma, actinic "
            f"keratosis) together is {p_malignant}, at or above {self.malignant_threshold:.2f}."
        )

    def assess(self, probs: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
        """Whether to refer, and the plain reasons, from raw probabilities."""
        p = dict(zip(class_names, (float(v) for v in probs), strict=True))
        p_mel = p.get("mel", 0.0)
        p_malignant = sum(v for k, v in p.items() if k in MALIGNANT)
        reasons = []
        if self.melanoma_threshold is not None and p_mel >= self.melanoma_threshold:
            reasons.append(self.melanoma_reason(f"{p_mel:.2f}"))
        if p_malignant >= self.malignant_threshold:
            reasons.append(self.malignant_reason(f"{p_malignant:.2f}"))
        return {
            "refer": bool(reasons),
            "reasons": reasons,
            "melanoma_probability": p_mel,
            "malignant_probability": p_malignant,
            "melanoma_threshold": self.melanoma_threshold,
            "malignant_threshold": self.malignant_threshold,
            "threshold_source": self.source,
        }


# ----------------------------------------------------------------------------- unsure


SCORES: dict[str, Callable[[ImageOutput], float]] = {"msp": lambda o: o.msp, "energy": lambda o: o.neg_energy}


@dataclass(frozen=True)
class ConfidenceGate:
    """Answer "unsure" when the confidence score is below ``threshold``."""

    method: str = "msp"
    threshold: float = DEFAULT_MSP_THRESHOLD
    source: str = "default (not validated)"
    model_version: str | None = None
    fit: dict[str, Any] | None = None
    fitted_on: dict[str, Any] | None = None  # everything the threshold depends on (see lesionnet.app.build)

    def __post_init__(self) -> None:
        if self.method not in SCORES:
            raise ValueError(f"Unknown confidence method '{self.method}'; use one of {sorted(SCORES)}.")

    def score(self, out: ImageOutput) -> float:
        return SCORES[self.method](out)

    def unsure(self, out: ImageOutput) -> bool:
        return self.score(out) < self.threshold

    def to_file(self) -> ConfidenceGateFile:
        return ConfidenceGateFile(
            method=cast(ConfidenceMethod, self.method),  # __post_init__ checked it; pydantic checks it again
            threshold=self.threshold,
            source=self.source,
            model_version=self.model_version,
            fit=self.fit,
            fitted_on=self.fitted_on,
        )

    def save(self, path: Path) -> Path:
        """Write atomically, so a server starting at the same time never reads half a file."""
        return write_confidence_gate(self.to_file(), path)

    @classmethod
    def load(cls, path: Path, model_version: str, fitted_on: dict[str, Any] | None = None) -> ConfidenceGate:
        """The gate in ``path``; refused (ContractError) unless it is a gate file of this version fitted for
        ``model_version`` (and on ``fitted_on``, when given)."""
        stored = read_confidence_gate(path)
        if stored.model_version != model_version:
            raise ContractError(
                f"{path} was fitted for model {stored.model_version}, not {model_version}. {REFIT_CONFIDENCE} Or "
                "give the matching checkpoints."
            )
        if fitted_on is not None and stored.fitted_on != fitted_on:
            previous = stored.fitted_on or {}
            changed = sorted(k for k in {*previous, *fitted_on} if previous.get(k) != fitted_on.get(k))
            raise ContractError(f"{path} was fitted with other {', '.join(changed)} than now. {REFIT_CONFIDENCE}")
        return cls(**stored.model_dump(exclude={"schema_version"}))


def fit_gate(
    predictor: Predictor,
    paths: Sequence[str | Path],
    method: str = "msp",
    quantile: float = 0.05,
    check: CheckThresholds | None = None,
    batch_size: int = 32,
    prediction: Prediction | None = None,
) -> ConfidenceGate:
    """Threshold = ``quantile`` of the scores of in-distribution images; also counts image-check refusals there.
    ``prediction``: the predictor's outputs for exactly ``paths``, when a shared pass already has them."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}.")
    if not paths:
        raise ValueError("No validation images to fit the confidence threshold on.")
    if prediction is not None and len(prediction) != len(paths):
        raise ValueError(f"The prediction holds {len(prediction)} images, not the {len(paths)} paths given.")
    refused = sum(not check_image(read_rgb(p), check).passed for p in paths)
    if prediction is None:
        prediction = predictor.predict_paths(paths, batch_size=batch_size, desc="confidence gate fit")
    scores = [SCORES[method](prediction.image(k)) for k in range(len(prediction))]
    threshold = float(np.quantile(scores, quantile))
    fit = {
        "n_images": len(scores),
        "quantile": quantile,
        "score_median": float(np.median(scores)),
        "image_check_refusals": refused,
    }
    log.info(
        "Confidence gate (%s): threshold %.4f = %.0f%% quantile of %d validation images; image check refused %d",
        method,
        threshold,
        100 * quantile,
        len(scores),
        refused,
    )
    return ConfidenceGate(
        method=method,
        threshold=threshold,
        model_version=predictor.version,
        fit=fit,
        source=f"{quantile:.0%} quantile of {len(scores)} validation images",
    )
