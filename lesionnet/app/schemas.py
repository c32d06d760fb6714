"""The REST API's response shapes, so /openapi.json documents what clients get and FastAPI checks every answer.

The service builds plain dicts (``LesionService.analyse`` / ``model_card``); these models describe them key for key
and in the same order. Every model forbids unknown keys, so a field added to the service without being added here
fails the tests instead of silently disappearing from the answer. Optional keys that some answers leave out (the
referral details of a refused image) are declared with a default and dropped again by the routes'
``response_model_exclude_unset``, so the JSON stays exactly what the service produced.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------- errors


class ErrorDetail(Schema):
    status: int = Field(description="The HTTP status code, repeated.")
    code: str = Field(description="A stable machine-readable code, e.g. file_too_large, unsupported_media_type.")
    message: str = Field(description="A plain-language explanation for the user.")


class ErrorResponse(Schema):
    """The body of every 4xx/5xx answer; never a stack trace."""

    error: ErrorDetail


# ----------------------------------------------------------------------------- /healthz


class HealthResponse(Schema):
    status: Literal["ok"]
    model_version: str = Field(description="<member names>@<first 12 hex of the checkpoints' combined SHA-256>.")
    in_flight: int = Field(description="Prediction requests admitted now (running or queued).")


# ----------------------------------------------------------------------------- /api/v1/predict


class ClassInfo(Schema):
    code: str = Field(description="HAM10000 class code: akiec, bcc, bkl, df, mel, nv or vasc.")
    name: str = Field(description="Plain-language name.")
    description: str
    malignant: bool = Field(description="Skin cancer or pre-cancer (mel, bcc, akiec).")


class ClassProbability(ClassInfo):
    probability: float = Field(description="Temperature-calibrated probability, rounded to 4 decimals.")


class ImageCheckResult(Schema):
    passed: bool = Field(description="False: the image was refused before the model (status 'rejected').")
    reasons: list[str] = Field(description="Plain reasons for a refusal; empty when passed.")
    stats: dict[str, float] = Field(description="The image statistics the check used.")


class Urgency(Schema):
    """Whether to see a dermatologist. A refused image has only refer, level, message and reasons."""

    refer: bool | None = Field(description="True: see a dermatologist; null: no answer (unsure or refused).")
    reasons: list[str]
    melanoma_probability: float | None = None
    malignant_probability: float | None = Field(None, description="P(mel) + P(bcc) + P(akiec), uncalibrated.")
    melanoma_threshold: float | None = Field(None, description="Validation-chosen; null without a scores.json.")
    malignant_threshold: float | None = None
    threshold_source: str | None = None
    level: Literal["see_dermatologist", "routine", "unknown"]
    message: str


class Confidence(Schema):
    method: Literal["msp", "energy"]
    score: float
    threshold: float = Field(description="Below it the answer is 'unsure'.")
    threshold_source: str


class GradCam(Schema):
    heatmap_png: str = Field(description="Base64 RGBA PNG: the heatmap alone, transparent where cold.")
    overlay_png: str = Field(description="Base64 RGB PNG: the model's view of the photo with the heatmap blended in.")
    width: int
    height: int
    crop_box: list[float] = Field(description="The model's view inside the upload: left, top, right, bottom (0-1).")
    layer: str = Field(description="The explained layer of the first ensemble member.")


class PredictResponse(Schema):
    """One photo's answer: 'ok' (top class), 'unsure' (no label) or 'rejected' (not a lesion photo)."""

    model_version: str
    disclaimer: str
    image_check: ImageCheckResult
    status: Literal["ok", "unsure", "rejected"]
    message: str
    top_class: ClassProbability | None = Field(description="Null unless status is 'ok'.")
    probabilities: list[ClassProbability] = Field(description="All classes, most likely first; empty if rejected.")
    urgency: Urgency
    confidence: Confidence | None = Field(description="Null if rejected.")
    gradcam: GradCam | None = Field(description="Null if rejected or Grad-CAM is off.")


# ----------------------------------------------------------------------------- /api/v1/model


class CheckpointInfo(Schema):
    name: str
    file: str
    sha256: str


class ModelInfo(Schema):
    version: str
    checkpoints: list[CheckpointInfo]
    weights: list[float] = Field(description="Ensemble weight of each checkpoint (fitted on validation, or equal).")
    class_names: list[str]
    tta: str
    device: str
    input_sizes: list[list[int]] = Field(description="(channels, height, width) of each member.")


class PerClassMetrics(Schema):
    recall: float | None
    precision: float | None
    auroc: float | None
    support: int | None


class Metrics(Schema):
    """evaluate.py's scores of the served model(s), as given in scores.json."""

    evaluated_on: str | None
    n_images: int | None
    accuracy: float | None
    accuracy_ci95: list[float | None] | None
    balanced_accuracy: float | None
    balanced_accuracy_ci95: list[float | None] | None
    macro_auroc: float | None
    macro_f1: float | None
    melanoma: dict[str, Any] | None = Field(
        description="Sensitivity/specificity at argmax and at the validation threshold, as evaluate.py writes them."
    )
    temperature: float | None
    ece_after_temperature: float | None
    per_class: dict[str, PerClassMetrics]


class ReferralRule(Schema):
    malignant_threshold: float
    melanoma_threshold: float | None
    target_sensitivity: float | None
    temperature: float
    source: str


class UnsureGate(Schema):
    method: Literal["msp", "energy"]
    threshold: float
    source: str
    fit: dict[str, Any] | None = Field(description="How the threshold was fitted (n_images, quantile, ...).")


class ImageCheckThresholds(Schema):
    min_contrast: float
    min_brightness: float
    max_brightness: float
    max_blank_fraction: float
    min_smoothness: float
    max_flat_edges: float
    max_saturation: float


class ModelCard(Schema):
    """What the model is, how well it did (with CIs when a scores.json was given) and what it must not be used for."""

    name: str
    model: ModelInfo
    intended_use: str
    not_a_diagnosis: str
    training_data: str
    classes: list[ClassInfo]
    metrics: Metrics | None
    metrics_note: str | None
    referral: ReferralRule
    unsure: UnsureGate
    image_check: ImageCheckThresholds
    limitations: list[str]
