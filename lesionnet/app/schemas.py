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

from lesionnet.contract.scores import MelanomaScores


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
    model_version: str = Field(
        description="<member names>@<first 12 hex of a SHA-256 of the checkpoints' SHA-256, their weights, the TTA "
        "and any logit adjustment>: another TTA is another model version."
    )
    demo_model: bool = Field(description="True: the served model was trained on the small embedded sample only.")
    in_flight: int = Field(description="Prediction requests admitted now (running or queued).")


# ----------------------------------------------------------------------------- /api/v1/predict


class ClassInfo(Schema):
    code: str = Field(description="HAM10000 class code: akiec, bcc, bkl, df, mel, nv or vasc.")
    name: str = Field(description="Plain-language name.")
    description: str
    malignant: bool = Field(description="Skin cancer or pre-cancer (mel, bcc, akiec).")


class ClassProbability(ClassInfo):
    probability: float = Field(
        description="The shown probability, calibrated on validation to how common each class is (the model card's "
        "shown_calibration), rounded to 4 decimals."
    )


class ImageCheckResult(Schema):
    passed: bool = Field(description="False: the image was refused before the model (status 'rejected').")
    reasons: list[str] = Field(description="Plain reasons for a refusal; empty when passed.")
    stats: dict[str, float] = Field(description="The image statistics the check used.")


class Urgency(Schema):
    """Whether to see a dermatologist. A refused image has only refer, level, message and reasons."""

    refer: bool | None = Field(
        description="True: see a dermatologist (the referral rule, an unfamiliar lesion or an unsure answer); "
        "null: no answer (refused)."
    )
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


class Heatmap(Schema):
    method: str = Field(description="cam: class activation map of the forward pass; gradcam: Grad-CAM (backward pass).")
    grid: list[list[float]] = Field(description="Rows x columns in [0, 1]: 1 = strongest evidence for the class.")
    crop_box: list[float] = Field(description="The model's view inside the upload: left, top, right, bottom (0-1).")
    class_code: str = Field(description="The explained class (the top class).")
    layer: str = Field(description="The explained layer of the first ensemble member.")


class ReferralCheck(Schema):
    """Whether the 'see a dermatologist' rule was checked on held-out images, for the line under the urgency."""

    validated: bool = Field(description="True: a validation-chosen melanoma threshold, scored by evaluate.py.")
    message: str = Field(description="The plain-language sentence the page shows under the urgency message.")
    evaluated_on: str | None = Field(description="The images the rule was checked on (scores.json 'evaluated').")
    n_images: int | None
    melanomas: int | None = Field(description="Melanomas among those images.")
    melanoma_sensitivity: float | None = Field(description="Share of them the melanoma threshold alone caught.")
    in_sample: bool | None = Field(description="True: checked on the validation images it was tuned on.")


class ImageTypeVerdict(Schema):
    """Question 1: is this a dermatoscope image at all? The only model-based refusal."""

    dermoscopy: bool = Field(description="False: not a dermatoscope image; the answer is 'rejected'.")
    score: float = Field(description="Logit of a classifier of dermatoscope images vs other photos; higher = more so.")
    threshold: float = Field(description="Refused below this.")
    source: str


class FamiliarityVerdict(Schema):
    """Question 2: is the lesion like the ones the model learnt? Never refuses: an unfamiliar lesion is answered
    'unsure' and sent to a dermatologist."""

    familiar: bool
    method: str = Field(description="mahalanobis | mahalanobis_class | knn, on L2-normalised pooled features.")
    score: float = Field(description="Higher = less like the validation lesions.")
    threshold: float = Field(description="Flagged above this (a high quantile of validation lesion scores).")
    percentile: float = Field(description="Share of validation lesion images scoring at or below this image.")
    source: str


class PredictResponse(Schema):
    """One photo's answer: 'ok' (top class), 'unsure' (no label; sent to a dermatologist) or 'rejected' (not a
    dermatoscope image, or a blank / broken one)."""

    model_version: str
    demo_model: bool = Field(description="True: trained on the small embedded sample only; show it as a demo.")
    disclaimer: str
    image_check: ImageCheckResult
    status: Literal["ok", "unsure", "rejected"]
    message: str
    top_class: ClassProbability | None = Field(
        description="The class decided on the model's scores, with its shown probability; null unless status is "
        "'ok'. A logit-adjusted model decides for balanced accuracy, so it need not be the first of probabilities."
    )
    probabilities: list[ClassProbability] = Field(
        description="All classes, highest shown probability first; empty if rejected."
    )
    urgency: Urgency
    referral_check: ReferralCheck
    confidence: Confidence | None = Field(description="Null if rejected.")
    heatmap: Heatmap | None = Field(description="Null if rejected or heatmaps are off (gradcam=false).")
    image_type: ImageTypeVerdict | None = Field(
        description="Question 1. Null if the image check refused it first or no image-type gate is fitted."
    )
    familiarity: FamiliarityVerdict | None = Field(
        description="Question 2. Null if refused before it (image check, question 1) or the gate is off."
    )


# ----------------------------------------------------------------------------- /api/v1/model


class CheckpointInfo(Schema):
    name: str
    file: str
    sha256: str


class LogitAdjustment(Schema):
    tau: float = Field(description="softmax(log p - tau log prior): 0 changes nothing, 1 balances the classes.")
    prior: list[float] = Field(description="Class frequencies of the training split, in class_names order.")


class ModelInfo(Schema):
    version: str
    checkpoints: list[CheckpointInfo]
    weights: list[float] = Field(description="Ensemble weight of each checkpoint (fitted on validation, or equal).")
    class_names: list[str]
    tta: str
    logit_adjustment: LogitAdjustment | None = Field(
        description="Post-hoc logit adjustment of the averaged probabilities, fitted on validation (or none)."
    )
    device: str
    input_sizes: list[list[int]] = Field(description="(channels, height, width) of each member.")


class PerClassMetrics(Schema):
    recall: float | None
    precision: float | None
    auroc: float | None
    support: int | None


class Bootstrap(Schema):
    unit: str = Field(description="What the 95% intervals resample: lesions (correlated images together) or images.")
    n_units: int
    resamples: int
    description: str


class ShownCalibration(Schema):
    method: str = Field(
        description="How the shown percentages are computed from the decision probabilities: temperature, "
        "prior-undo+temperature (a logit adjustment taken back out), bias+temperature or vector."
    )
    ece: float = Field(description="Top-label expected calibration error of the shown percentages.")
    classwise_ece: float = Field(description="Class-wise expected calibration error of the shown percentages.")
    log_loss: float
    brier: float


class Metrics(Schema):
    """evaluate.py's scores of the served model(s), as given in scores.json."""

    evaluated_on: str | None
    set: str | None = Field(description="test, validation (in-sample, optimistic), external, ...")
    in_sample: bool
    n_images: int | None
    tta: str
    bootstrap: Bootstrap | None
    provenance: dict[str, str] = Field(
        description="Per served checkpoint: 'checked' (no scored image was used in training, nor in validation "
        "unless in_sample: in-sample scores are on the validation images) or 'unknown (...)'."
    )
    accuracy: float | None
    accuracy_ci95: list[float | None] | None
    balanced_accuracy: float | None
    balanced_accuracy_ci95: list[float | None] | None
    macro_auroc: float | None
    macro_f1: float | None
    melanoma: MelanomaScores | None = Field(
        description="AUROC and sensitivity/specificity at argmax and at the validation threshold (evaluate.py)."
    )
    temperature: float | None
    ece: float | None = Field(description="Expected calibration error before temperature scaling.")
    ece_after_temperature: float | None
    classwise_ece: float | None = Field(
        description="Class-wise expected calibration error (every class's probability against its frequency, "
        "averaged over the classes) before any calibration; null in scores files that predate it."
    )
    brier: float | None = Field(description="Multi-class Brier score before any calibration.")
    log_loss: float | None = Field(description="Log loss before any calibration.")
    shown_calibration: ShownCalibration | None = Field(
        description="How calibrated the percentages the answers show are on the evaluated set (evaluate.py's display "
        "calibration, fitted on validation); null in scores files that predate it."
    )
    per_class: dict[str, PerClassMetrics]


class ReferralRule(Schema):
    malignant_threshold: float
    melanoma_threshold: float | None
    target_sensitivity: float | None
    temperature: float
    source: str
    display_method: str = Field(description="How the shown percentages are computed (see ShownCalibration).")
    display_scale: list[float] | None = Field(
        description="Shown percentages: softmax(display_scale * log p + display_bias) per class; null: "
        "softmax(log p / temperature). The rules compare p itself."
    )
    display_bias: list[float] | None


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


class Split(Schema):
    method: str = Field(description="lesion (no lesion in two splits) | legacy (by image, leaky) | file (split.csv).")
    seed: int | None
    fractions: dict[str, float] | None
    split_file: str | None = Field(description="The name of the split file it reused, if any.")
    description: str


class MemberTraining(Schema):
    """What one checkpoint was trained on, from its provenance record and its run's metrics.json."""

    name: str
    images: dict[str, int] = Field(description="Images per split (train, val from the checkpoint; test from the run).")
    lesions: dict[str, int] | None = Field(description="Distinct lesions per split, from the checkpoint's provenance.")
    sources: list[str] = Field(description="Where the counts come from: checkpoint provenance, run metrics.json.")
    data_root: str | None = Field(description="The training data folder's name (not its path on the server).")
    embedded_sample: bool = Field(description="The run's data root is the sample shipped inside LesionNet.")
    split: Split | None
    demo_reason: str | None = Field(description="Why it counts as a demo model; null if it does not.")


class TrainingData(Schema):
    summary: str = Field(description="Plain-language sentences: images, data and split of each model.")
    dataset: str = Field(description="About HAM10000, the data set the images come from.")
    demo_model: bool = Field(description="True if any served checkpoint counts as a demo model (see demo_reason).")
    demo_notice: str | None = Field(description="The banner the page shows for a demo model.")
    members: list[MemberTraining]


class ModelCard(Schema):
    """What the model is, how well it did (with CIs when a scores.json was given) and what it must not be used for."""

    name: str
    model: ModelInfo
    intended_use: str
    not_a_diagnosis: str
    training_data: TrainingData
    classes: list[ClassInfo]
    metrics: Metrics | None
    metrics_note: str | None
    performance: str = Field(description="The test figures in plain words, or 'Not evaluated: ...'.")
    referral: ReferralRule
    referral_check: ReferralCheck
    unsure: UnsureGate
    image_check: ImageCheckThresholds
    limitations: list[str]
