"""The fitted gates' files: the confidence ("unsure") gate, the feature-space familiarity (OOD) gate and the image-type
("is this a dermatoscope image?") gate, one writer and one reader each.

Both are fitted on a training run's validation split for one model (``Predictor.version``): by the app at its start
(``lesionnet.app.build``, cached under ``unsure.cache_dir`` by a hash of everything the fit depends on, so a cached
file that cannot be read is simply refitted) or, for the OOD gate, by ``bench/ood_eval.py --gate-out``; a given file
(``unsure.gate_file=``, ``ood.gate_file=``) is used as it is. A file of another version, or one written before the
confidence gate's file was versioned, is refused with its path and the fix: refit it.

What the gates compute with these values is ``lesionnet.inference.decision`` (``policy.ConfidenceGate``,
``ood.OodGate``); whether a file was fitted for the model being served is checked there.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from lesionnet.contract.files import ContractError, read_json, write_json

CONFIDENCE_GATE_VERSION = 1
ConfidenceMethod = Literal["msp", "energy"]
REFIT_CONFIDENCE = (
    "Delete the file so that the app refits the gate on the run's validation split (serve without "
    "unsure.gate_file; a cached gate under unsure.cache_dir is refitted by itself)."
)

OOD_GATE_VERSION = 1
OOD_METHODS: tuple[str, ...] = ("mahalanobis", "mahalanobis_class", "knn")
OodMethod = Literal["mahalanobis", "mahalanobis_class", "knn"]
REFIT_OOD = (
    "Refit the gate for this model: serve without ood.gate_file so that the app fits it on the run's validation "
    "split (a cached gate is refitted by itself), or write one with bench/ood_eval.py --run <run> --gate-out <file>."
)


def check_fitted_for(
    path: str | Path, fitted: tuple[str, str], serving: tuple[str, str | None], why: str, refit: str
) -> None:
    """Refuse a feature-space gate file fitted for another model or TTA: ``fitted`` and ``serving`` are (model
    version, TTA); a ``serving`` TTA of None is not checked; ``why`` says what the file's numbers mean elsewhere."""
    (fitted_version, fitted_tta), (version, tta) = fitted, serving
    if fitted_version != version:
        raise ContractError(f"{path} was fitted for model {fitted_version}, not {version}: {why}. {refit}")
    if tta is not None and fitted_tta != tta:
        raise ContractError(f"{path} was fitted with tta={fitted_tta}, the model now runs tta={tta}. {refit}")


# ----------------------------------------------------------------------------- confidence gate


class ConfidenceGateFile(BaseModel):
    """The confidence gate as stored: its score, threshold, the model it was fitted for and what it was fitted on."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = CONFIDENCE_GATE_VERSION
    method: ConfidenceMethod
    threshold: float
    source: str
    model_version: str | None
    fit: dict[str, Any] | None  # n_images, quantile, score_median, image_check_refusals
    fitted_on: dict[str, Any] | None  # everything the threshold depends on (lesionnet.app.build.gate_fit_inputs)


def write_confidence_gate(gate: ConfidenceGateFile, path: str | Path) -> Path:
    """Atomically (a server starting at the same time never reads half a file)."""
    return write_json(gate, path)


def read_confidence_gate(path: str | Path) -> ConfidenceGateFile:
    """The confidence gate file at this version; an older (unversioned) or other file is a ContractError."""
    return read_json(ConfidenceGateFile, path, CONFIDENCE_GATE_VERSION, "confidence gate file", REFIT_CONFIDENCE)


# ----------------------------------------------------------------------------- OOD gate


class StoredArray(BaseModel):
    """A float32 array in JSON: shape plus the little-endian bytes in base64 (a 1280x1280 precision is ~8.7 MB
    this way, ~30 MB as decimal text)."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["float32"] = "float32"
    shape: list[int]
    base64: str

    @classmethod
    def of(cls, array: np.ndarray) -> StoredArray:
        data = np.ascontiguousarray(array, dtype="<f4")
        return cls(shape=list(data.shape), base64=base64.b64encode(data.tobytes()).decode("ascii"))

    def array(self) -> np.ndarray:
        data = np.frombuffer(base64.b64decode(self.base64), dtype="<f4")
        if data.size != math.prod(self.shape):
            raise ValueError(f"array of shape {self.shape} holds {data.size} values")
        return data.reshape(self.shape).astype(np.float32)


class OodGateFile(BaseModel):
    """The OOD gate as stored with the model: what it computes, its threshold, and what it was fitted on."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = OOD_GATE_VERSION
    method: OodMethod
    model_version: str
    tta: str
    threshold: float
    quantile: float
    n_images: int
    n_groups: int
    folds: int | None
    k: int | None
    shrinkage: float | None
    labels: list[str]
    means: StoredArray | None
    precision: StoredArray | None
    references: StoredArray | None
    validation_scores: list[float]  # out-of-sample, one per validation image: a new image's percentile among them
    source: str


def write_ood_gate(gate: OodGateFile, path: str | Path) -> Path:
    """Atomically (a server starting at the same time never reads half a file)."""
    return write_json(gate, path)


def read_ood_gate(path: str | Path) -> OodGateFile:
    """The OOD gate file at this version; any problem is a ContractError naming the file and the fix."""
    return read_json(OodGateFile, path, OOD_GATE_VERSION, "feature-space (OOD) gate file", REFIT_OOD)


# ----------------------------------------------------------------------------- image-type gate

IMAGE_TYPE_GATE_VERSION = 1
REFIT_IMAGE_TYPE = (
    "Fit the dermoscopy gate for this model with bench/image_type_eval.py --run <run> --gate-out <file> and serve "
    "with image_type.gate_file=<file>."
)


class ImageTypeGateFile(BaseModel):
    """The "is this a dermatoscope image?" gate as stored: a logistic regression on the L2-normalised pooled features
    (``weights``, ``bias``), its threshold on the logit, the model it was fitted for and the images it was fitted on."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = IMAGE_TYPE_GATE_VERSION
    model_version: str
    tta: str
    weights: StoredArray  # (D,)
    bias: float
    threshold: float  # refuse when the logit is below it
    l2: float  # the ridge penalty the weights were fitted with
    fit: dict[str, Any]  # counts of positives / negatives per source, the threshold rule
    source: str


def write_image_type_gate(gate: ImageTypeGateFile, path: str | Path) -> Path:
    """Atomically (a server starting at the same time never reads half a file)."""
    return write_json(gate, path)


def read_image_type_gate(path: str | Path) -> ImageTypeGateFile:
    """The image-type gate file at this version; any problem is a ContractError naming the file and the fix."""
    return read_json(
        ImageTypeGateFile, path, IMAGE_TYPE_GATE_VERSION, "image-type (dermoscopy) gate file", REFIT_IMAGE_TYPE
    )
