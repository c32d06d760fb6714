"""The on-device mode's files: ``/on-device/policy.json`` (what the page applies in the browser) and the export's
sidecar ``<model>.json`` (what a runtime needs to feed the exported model), one writer and one reader each.

``policy.json`` is served by the app (``lesionnet.app.ondevice.OnDevice.policy``, kept by the page's service worker
for offline use) and read by ``static/ondevice.js``; :func:`read_on_device_policy` is its reader on the Python side
(the tests check what the app serves with it). The sidecar is written by ``lesionnet.export`` beside the ONNX or
TorchScript file; its preprocessing part (:class:`Preprocessing`) is also the model file's own metadata and the
policy's ``preprocessing``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from lesionnet.contract.files import ContractError, read_json, write_json

ON_DEVICE_VERSION = 2
EXPORT_SIDECAR_VERSION = 1
RESTART = "Restart the server with this LesionNet version (and reload the page) so that both speak the same version."
RE_EXPORT = "Export the checkpoint again with this LesionNet version: lesionnet export ckpt=<checkpoint>."


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Preprocessing(_Strict):
    """How to feed the exported graph and read its output (``lesionnet.export.preprocessing_metadata``)."""

    lesionnet_format: Literal[1] = 1  # the version of this part, as the model file's own metadata carries it
    model_name: str
    backbone: str
    class_names: list[str]
    input_name: str
    output_name: str
    layout: Literal["NCHW"]
    input_size: list[int]  # [3, height, width]
    mean: list[float]
    std: list[float]
    interpolation: str
    crop_pct: float
    resize: str
    pixel_scale: str
    colour_constancy: dict[str, Any] | None  # applied inside the graph
    output: str


# ----------------------------------------------------------------------------- export sidecar


class ExportSidecar(Preprocessing):
    """``<model>.json`` beside an exported model: its preprocessing, outputs and the parity check it passed."""

    schema_version: int = EXPORT_SIDECAR_VERSION
    outputs: list[str]
    format: Literal["onnx", "torchscript"]
    file: str
    checkpoint: str
    opset: int | None
    parity: dict[str, int | float]  # largest differences to PyTorch per output, n_images and atol


def write_export_sidecar(sidecar: ExportSidecar, path: str | Path) -> Path:
    """Atomically (an app serving the folder never reads half a file)."""
    return write_json(sidecar, path)


def read_export_sidecar(path: str | Path) -> ExportSidecar:
    """The sidecar at this version; any problem is a ContractError naming the file and the fix."""
    return read_json(ExportSidecar, path, EXPORT_SIDECAR_VERSION, "model export sidecar", RE_EXPORT)


# ----------------------------------------------------------------------------- on-device policy


class OnDeviceClass(_Strict):
    code: str
    name: str
    description: str
    malignant: bool


class CheckRule(_Strict):
    stat: str
    op: Literal["<", ">"]
    threshold: str  # a key of ImageCheckSpec.thresholds
    reason: str


class ImageCheckSpec(_Strict):
    """``lesionnet.inference.decision.image_check.check_spec``: how to take the statistics, thresholds and rules."""

    params: dict[str, int]
    thresholds: dict[str, float]
    rules: list[CheckRule]


class OnDeviceConfidence(_Strict):
    method: Literal["msp", "energy"]
    threshold: float
    source: str


class OnDeviceFamiliarity(_Strict):
    """Question 2: the graph's ``ood_score`` above ``threshold`` flags the lesion as unfamiliar (never refused)."""

    method: str
    threshold: float
    source: str
    validation_scores: list[float]  # sorted: a score's percentile among the validation lesions


class OnDeviceImageType(_Strict):
    """Question 1: the graph's ``image_type_score`` below ``threshold`` refuses the image as not dermoscopy."""

    threshold: float
    source: str


class ReferralReasons(_Strict):
    melanoma: str | None  # with "{p}" where the probability goes; None without a melanoma threshold
    malignant: str


class OnDeviceReferral(_Strict):
    """``ReferralPolicy``'s rule, temperature and display calibration, with the server's sentences."""

    malignant_threshold: float
    melanoma_threshold: float | None
    target_sensitivity: float | None
    temperature: float
    source: str
    malignant_classes: list[str]
    reasons: ReferralReasons
    # shown percentages softmax(display_scale * log p + display_bias); None: softmax(log p / temperature)
    display_scale: list[float] | None = None
    display_bias: list[float] | None = None


class UploadLimitsSpec(_Strict):
    min_side: int
    max_pixels: int


class OnDevicePolicy(_Strict):
    """The whole ``/on-device/policy.json``. When the mode is not available only the first fields are set, with
    ``reason`` saying why; otherwise everything the page compares, computes and says."""

    schema_version: int = ON_DEVICE_VERSION
    available: bool
    reason: str | None
    model_version: str
    demo_model: bool
    disclaimer: str
    limits: UploadLimitsSpec
    model_url: str | None = None
    runtime: dict[str, str] | None = None  # "module" and "wasm": onnxruntime-web's files
    preprocessing: Preprocessing | None = None
    heatmap: bool | None = None  # the graph outputs a CAM grid to show
    classes: list[OnDeviceClass] | None = None
    image_check: ImageCheckSpec | None = None
    confidence: OnDeviceConfidence | None = None
    image_type: OnDeviceImageType | None = None
    familiarity: OnDeviceFamiliarity | None = None
    referral: OnDeviceReferral | None = None
    referral_check: dict[str, Any] | None = None  # the API's ReferralCheck (lesionnet.app.schemas)
    messages: dict[str, str] | None = None

    @model_validator(mode="after")
    def _complete(self) -> OnDevicePolicy:
        needed: tuple[str, ...] = ("model_url", "runtime", "preprocessing", "heatmap", "classes", "image_check")
        needed += ("confidence", "referral", "referral_check", "messages")
        missing = [name for name in needed if getattr(self, name) is None]
        if self.available and missing:
            raise ValueError(f"an available on-device mode needs {missing}")
        if not self.available and not self.reason:
            raise ValueError("an unavailable on-device mode needs the reason")
        return self


def on_device_policy_json(policy: OnDevicePolicy) -> dict[str, Any]:
    """The document served as ``/on-device/policy.json``: the one writer (its fields as JSON values)."""
    return policy.model_dump(mode="json")


def read_on_device_policy(document: str | bytes | dict[str, Any], source: str | Path) -> OnDevicePolicy:
    """A served policy (its text or parsed JSON) at this version; ``source`` (a URL or file) names it in the
    ContractError any problem raises."""
    try:
        raw = json.loads(document) if isinstance(document, str | bytes) else document
    except ValueError as err:
        raise ContractError(f"{source} is not JSON: {err}. {RESTART}") from err
    found = raw.get("schema_version") if isinstance(raw, dict) else None
    if found != ON_DEVICE_VERSION:
        raise ContractError(
            f"{source} is an on-device policy of schema version {found}; this LesionNet reads version "
            f"{ON_DEVICE_VERSION}. {RESTART}"
        )
    try:
        return OnDevicePolicy.model_validate(raw)
    except ValidationError as err:
        raise ContractError(f"{source} is not a valid on-device policy: {err}. {RESTART}") from err
