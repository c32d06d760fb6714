"""evaluate.py's ``scores.json``: what was scored, by which checkpoints (by sha256), with which TTA and weights.

Written once by evaluate.py (:func:`write_scores`), read by the app (:func:`read_scores`), which serves a scores file
only for exactly the checkpoints, TTA and ensemble weights it was computed with (:func:`scores_for`).

Every row (a checkpoint, the ensemble, a ``+posthoc-la`` row) is a typed :class:`ScoresRow`, read by attribute:
a bad value (a temperature of "hot") is refused when the file is read, with its path and the fix.

Version 2 adds ``external`` (the external sets scored in the same run, each with its own rows) and
``classes_present``; a version 1 file is the same document without them and is still read.

Version 3 binds every row to what it scored: ``digest`` (:class:`RowDigest`, computed by :func:`write_scores`) is the
sha256 of the row's canonical JSON together with the row's name and the file's header (the checkpoints by sha256,
the TTA, the ensemble members and weights, the set), with fingerprints that name a changed field
(:mod:`lesionnet.contract.digest`). The app serves a file only when every row matches its digest
(:func:`verify_scores`), and names the field that differs. This detects mistakes and hand edits (a weight, the TTA, a
threshold changed after evaluate.py wrote the file); it is not a signature. Files of versions 1 and 2 are still read
(reports, tables) but carry no digest, so the app refuses them: re-run evaluate.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from lesionnet.contract.digest import changed_fields, fingerprints, sha256_of
from lesionnet.contract.files import ContractError, read_json, write_json

SCORES_VERSION = 3
# 1: before external sets (a subset of 2); 2: before row digests (read, but the app cannot verify it and refuses it)
READABLE_SCORES_VERSIONS: tuple[int, ...] = (1, 2, SCORES_VERSION)
FIRST_VERIFIABLE_VERSION = 3
ENSEMBLE = "ensemble"
POSTHOC_LA = "+posthoc-la"  # suffix of the rows evaluate.py posthoc_logit_adjustment=true adds (tau fitted on val)
RE_EVALUATE = "Run evaluate.py on the checkpoints you serve (same TTA) and pass its scores.json."
WEIGHT_TOLERANCE = 1e-6


class OperatingPoint(BaseModel):
    """Melanoma one-vs-rest sensitivity and specificity at one rule (None where a rate has no denominator)."""

    model_config = ConfigDict(extra="forbid")

    sensitivity: float | None
    specificity: float | None
    threshold: float | None  # None: the argmax rule


class ValidationThreshold(OperatingPoint):
    """At the P(mel) threshold chosen on validation for ``target_sensitivity``, applied unchanged to the scored set."""

    target_sensitivity: float


class MelanomaScores(BaseModel):
    model_config = ConfigDict(extra="forbid")

    argmax: OperatingPoint
    auroc: float | None
    val_threshold: ValidationThreshold | None = None  # None: no validation split with melanomas


class ClassScores(BaseModel):
    """One class of a row: None where undefined (no image of the class in the scored set)."""

    model_config = ConfigDict(extra="forbid")

    precision: float | None
    recall: float | None
    f1: float | None
    auroc: float | None
    support: int


class ValidationFigures(BaseModel):
    """The row's figures on the validation split: what members, recipes and ensembles are chosen by."""

    model_config = ConfigDict(extra="forbid")

    accuracy: float
    balanced_accuracy: float


class LogitAdjustment(BaseModel):
    """Post-hoc logit adjustment (Menon et al., ICLR 2021): softmax(log p - tau * log prior)."""

    model_config = ConfigDict(extra="forbid")

    tau: float
    prior: list[float]  # the training split's class frequencies, in class order

    @field_validator("prior")
    @classmethod
    def _positive(cls, prior: list[float]) -> list[float]:
        if not prior or any(p <= 0 for p in prior):
            raise ValueError(f"every class frequency of the prior must be positive, got {prior}")
        return prior


class FittedAdjustment(LogitAdjustment):
    """The adjustment of a ``+posthoc-la`` row: tau fitted on validation for row ``of``."""

    of: str


# How the shown probabilities are computed from a row's, simplest first (see DisplayCalibration).
DisplayMethod = Literal["temperature", "prior-undo+temperature", "bias+temperature", "vector"]


class DisplayCalibration(BaseModel):
    """How the probabilities shown for a row are computed from the row's probabilities p: softmax(scale * log p + bias),
    per class, fitted on validation. Decisions (argmax, the referral thresholds) keep using p itself.

    ``method`` is the family the cross-validated validation log loss (``validation_log_loss``, per candidate) chose:
    ``temperature`` (scale 1/T, bias 0), ``prior-undo+temperature`` (bias tau * log prior / T: undoes a logit
    adjustment before the temperature, so a logit-adjusted row shows probabilities of the class mix),
    ``bias+temperature`` (one scale, a bias per class) or ``vector`` (a scale and a bias per class, Guo et al. 2017).
    An empty ``validation_log_loss``: too few validation images to cross-validate, the fewest-parameter family.
    """

    model_config = ConfigDict(extra="forbid")

    method: DisplayMethod
    scale: list[float]  # per class, positive
    bias: list[float]  # per class
    validation_log_loss: dict[str, float] = {}

    @model_validator(mode="after")
    def _shapes(self) -> DisplayCalibration:
        if not self.scale or len(self.scale) != len(self.bias) or any(not 0 < a < float("inf") for a in self.scale):
            raise ValueError(f"scale and bias need one value per class, scale positive: {self.scale}, {self.bias}")
        return self


class CalibrationFigures(BaseModel):
    """How calibrated a row's shown probabilities are on the scored set: top-label and class-wise ECE, log loss,
    Brier score."""

    model_config = ConfigDict(extra="forbid")

    ece: float
    classwise_ece: float
    log_loss: float
    brier: float


class GroupFigures(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_images: int
    accuracy: float
    balanced_accuracy: float | None


class BootstrapRecord(BaseModel):
    """What the 95% intervals resample: lesions where their ids are known, images otherwise."""

    model_config = ConfigDict(extra="forbid")

    unit: str  # "lesions" | "images"
    n_units: int
    resamples: int
    description: str


Interval = tuple[float | None, float | None]  # None: no resample defined the metric


class RowDigest(BaseModel):
    """What binds a row to what it scored (schema version 3): ``sha256`` of the canonical JSON of the row (all its
    fields but this one), its name and the file's header (``models`` by sha256, ``tta``, ``ensemble`` members and
    weights, the set, ...; for an external set's row, that set's header too); ``fields``: a short fingerprint of every
    leaf, grouped by its first two path components, to name what changed. Written by :func:`write_scores`. Detects
    mistakes and edits, it is not a signature: whoever edits the file can recompute it."""

    model_config = ConfigDict(extra="forbid")

    sha256: str
    fields: dict[str, str]


class ScoresRow(BaseModel):
    """The scores of one row (a checkpoint, the ensemble, or either with post-hoc logit adjustment) on one set."""

    model_config = ConfigDict(extra="forbid")

    n: int
    accuracy: float
    balanced_accuracy: float | None  # mean recall over the classes the set has
    macro_f1: float | None
    macro_auroc: float | None
    log_loss: float
    ece: float  # top-label
    classwise_ece: float | None = None  # every class's probability (None: written before it was reported)
    brier: float | None = None
    per_class: dict[str, ClassScores]
    confusion_matrix: list[list[int]]  # rows: true class
    melanoma: MelanomaScores | None = None  # None: the model has no melanoma class
    # 95% intervals of accuracy, balanced_accuracy and, where defined, mel_auroc, mel_sensitivity, mel_specificity
    ci95: dict[str, Interval] = {}
    validation: ValidationFigures | None = None  # None: no validation split (nothing was chosen or fitted)
    temperature: float | None = None  # fitted on validation
    ece_after_temperature: float | None = None
    log_loss_after_temperature: float | None = None
    classwise_ece_after_temperature: float | None = None
    brier_after_temperature: float | None = None
    logit_adjustment: FittedAdjustment | None = None  # the ``+posthoc-la`` rows only
    # the probabilities the app shows: how they are computed (fitted on validation), and how calibrated they are here
    display: DisplayCalibration | None = None
    displayed: CalibrationFigures | None = None
    # accuracy on images whose lesion trained the model vs the rest (the seed's image-level split only)
    seen_lesions: dict[str, GroupFigures] | None = None
    digest: RowDigest | None = None  # None: a file of schema version 1 or 2 (see RowDigest)

    @property
    def at_val_threshold(self) -> ValidationThreshold | None:
        """Melanoma sensitivity/specificity at the validation threshold, None where no threshold was chosen."""
        return self.melanoma.val_threshold if self.melanoma is not None else None


class ScoredModel(BaseModel):
    """One checkpoint that was scored; ``sha256`` is its identity, ``name`` only labels rows and files."""

    model_config = ConfigDict(extra="forbid")

    name: str
    file: str
    sha256: str
    provenance: str  # "checked" (no overlap with the scored set) | "unknown (...)" (checkpoint predates provenance)


class EnsembleRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: str
    members: list[str]  # names of ``models`` in the ensemble
    weights: list[float]  # aligned with ``members``, summing to 1


class ExternalSetScores(BaseModel):
    """One external set (``external=[...]``) scored in the same run, by the same rows as the main set."""

    model_config = ConfigDict(extra="forbid")

    name: str  # external.<key>.name, else <key> (lesionnet/conf/external/<key>.yaml): its folder and column group
    evaluated: str  # where its images and labels come from
    n_images: int
    predictions: str  # folder (relative to scores.json) with predictions_<row>.csv and ground_truth_isic.csv
    classes_present: list[str] | None = None  # the classes its labels have: balanced accuracy averages over these
    bootstrap: BootstrapRecord | None = None
    training_overlap: dict[str, dict[str, int]] = {}
    scores: dict[str, ScoresRow] | None = None  # None: unlabelled, predictions only


class ScoresFile(BaseModel):
    """The whole ``scores.json``."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCORES_VERSION
    evaluated: str  # where the scored images come from
    set: str  # what they are: "test", "validation (in-sample, optimistic)", "external", "external (unlabelled)"
    in_sample: bool = False
    n_images: int
    models: list[ScoredModel]
    tta: str
    ensemble: EnsembleRecord | None = None
    validation: str | None = None
    bootstrap: BootstrapRecord | None = None
    training_overlap: dict[str, dict[str, int]] = {}
    # left out: a training image's file or picture under another image id ("target" = scored, "selection" = val)
    excluded_duplicates: dict[str, list[str]] = {}
    scores: dict[str, ScoresRow] | None = None  # None: unlabelled, predictions only
    classes_present: list[str] | None = None  # the classes the scored labels have (balanced accuracy's classes)
    final: str | None = None
    plots: dict[str, str] | None = None
    external: list[ExternalSetScores] = []  # further sets scored by the same rows, in the order they were given

    @property
    def final_scores(self) -> ScoresRow | None:
        """The row of the final model (the ensemble where there is one), None on an unlabelled set."""
        return self.scores[self.final] if self.scores is not None and self.final is not None else None


def write_scores(scores: ScoresFile, path: str | Path) -> Path:
    """Write ``scores`` with every row's :class:`RowDigest` (set on ``scores`` too), computed on the document exactly
    as a reader will parse it; a document no reader could parse is refused here."""
    try:
        stamped = ScoresFile.model_validate_json(scores.model_dump_json())
    except ValidationError as err:
        raise ContractError(f"Refusing to write {path}: read back, it would not be a valid scores file: {err}") from err
    for (_, external, rows), (_, _, given) in zip(_row_sets(stamped), _row_sets(scores), strict=True):
        for name, row in rows.items():
            covered = _covered(stamped, name, row, external)
            row.digest = RowDigest(sha256=sha256_of(covered), fields=fingerprints(covered))
            given[name].digest = row.digest
    return write_json(stamped, path)


def read_scores(path: str | Path) -> ScoresFile:
    """The scores file at ``path``, of the current version or of an older one it extends (see the module doc)."""
    try:
        found = json.loads(Path(path).read_text()).get("schema_version")
    except (OSError, ValueError, AttributeError):
        found = None  # read_json reports the problem with the path and the fix
    version = found if found in READABLE_SCORES_VERSIONS else SCORES_VERSION
    return read_json(ScoresFile, path, version, "scores file", RE_EVALUATE)


def scores_for(
    scores: ScoresFile, path: str | Path, sha256: Sequence[str], tta: str, logit_adjusted: bool = False
) -> tuple[str, ScoresRow, list[float]]:
    """(row name, its scores, the ensemble weights aligned with ``sha256``) for exactly these served checkpoints;
    ``logit_adjusted`` picks the row with evaluate.py's post-hoc logit adjustment (its ``logit_adjustment``).

    Refused with the file and the fix when the checkpoints, the TTA or (for an ensemble) the members differ from
    what was scored: a threshold fitted for one model means nothing for another.
    """
    if scores.scores is None:
        raise ContractError(f"{path} has no scores (evaluate.py ran on an unlabelled set). {RE_EVALUATE}")
    verify_scores(scores, path)
    if scores.tta != tta:
        raise ContractError(f"{path} was computed with tta={scores.tta}, the server runs tta={tta}. {RE_EVALUATE}")
    by_sha = {model.sha256: model for model in scores.models}
    unknown = [digest[:12] for digest in sha256 if digest not in by_sha]
    if unknown:
        raise ContractError(
            f"{path} does not score the served checkpoint(s) with sha256 {unknown} (it scores "
            f"{[m.file + '@' + m.sha256[:12] for m in scores.models]}). {RE_EVALUATE}"
        )
    if len(sha256) == 1:
        name = _row(scores, path, by_sha[sha256[0]].name, logit_adjusted)
        return name, scores.scores[name], [1.0]
    names = [by_sha[digest].name for digest in sha256]
    if scores.ensemble is None or sorted(scores.ensemble.members) != sorted(names):
        evaluated = scores.ensemble.members if scores.ensemble else []
        raise ContractError(
            f"{path} scores an ensemble of {sorted(evaluated)}, the server loads {sorted(names)}. Serve the members "
            f"the evaluation chose, or {RE_EVALUATE[0].lower()}{RE_EVALUATE[1:]}"
        )
    weights = [scores.ensemble.weights[scores.ensemble.members.index(name)] for name in names]
    if not np.isclose(sum(weights), 1.0, atol=WEIGHT_TOLERANCE):
        raise ContractError(f"{path}: ensemble weights {weights} do not sum to 1. {RE_EVALUATE}")
    name = _row(scores, path, ENSEMBLE, logit_adjusted)
    return name, scores.scores[name], weights


def _row(scores: ScoresFile, path: str | Path, name: str, logit_adjusted: bool) -> str:
    if not logit_adjusted:
        return name
    row = name + POSTHOC_LA
    adjusted = (scores.scores or {}).get(row)
    if adjusted is None or adjusted.logit_adjustment is None:
        raise ContractError(
            f"{path} has no post-hoc logit-adjusted row for {name}. Run evaluate.py on the served checkpoints with "
            "posthoc_logit_adjustment=true (tau is fitted on validation), or serve without logit_adjustment=true."
        )
    return row


# the names of the fields whose edit matters most to the app; any other field is named by its path alone
FIELD_LABELS = {
    "name": "row name",
    "file.schema_version": "schema version",
    "file.tta": "tta",
    "file.models[*].sha256": "checkpoint sha256",
    "file.models[*].name": "model name",
    "file.ensemble.members": "ensemble members",
    "file.ensemble.weights": "ensemble weights",
    "file.ensemble.mode": "ensemble mode",
    "file.in_sample": "in-sample flag",
    "row.melanoma.val_threshold.threshold": "melanoma threshold",
    "row.melanoma.val_threshold.target_sensitivity": "melanoma target sensitivity",
    "row.temperature": "temperature",
    "row.logit_adjustment.tau": "logit adjustment tau",
    "row.logit_adjustment.prior": "logit adjustment prior",
    "row.display.scale": "display calibration scale",
    "row.display.bias": "display calibration bias",
}


def _row_sets(scores: ScoresFile) -> Iterator[tuple[str, ExternalSetScores | None, dict[str, ScoresRow]]]:
    """(where in the file, the external set or None, its rows) for the scored set, then each external set."""
    yield "", None, scores.scores or {}
    for index, external in enumerate(scores.external):
        yield f"external[{index}].", external, external.scores or {}


def _json(model: BaseModel, exclude: set[str]) -> Any:
    """``model`` as the JSON the file holds (the writer's serialisation, e.g. NaN as null), less ``exclude``."""
    return json.loads(model.model_dump_json(exclude=exclude))


def _covered(scores: ScoresFile, name: str, row: ScoresRow, external: ExternalSetScores | None) -> dict[str, Any]:
    """What a row's digest covers: the row but its digest, its name, the file's header and its set's header."""
    covered = {"name": name, "row": _json(row, {"digest"}), "file": _json(scores, {"scores", "external"})}
    if external is not None:
        covered["set"] = _json(external, {"scores"})
    return covered


def _describe(field: str, where: str, name: str) -> str:
    """A changed field in words and where it sits in the file: ``melanoma threshold
    (scores.m.melanoma.val_threshold.threshold)``, ``ensemble weights (ensemble.weights)``, ``tta``."""
    label = FIELD_LABELS.get(re.sub(r"\[\d+\]", "[*]", field))
    part, _, rest = field.partition(".")
    location = {
        "name": f"{where}scores.{name}",
        "row": f"{where}scores.{name}.{rest}",
        "file": rest,
        "set": f"{where}{rest}",
    }.get(part, field)
    return location if label is None or label == location else f"{label} ({location})"


def verify_scores(scores: ScoresFile, path: str | Path) -> None:
    """Refuse ``scores`` unless every row (external sets' too) matches its digest, naming the fields that differ: the
    file is then the one evaluate.py wrote (checkpoints, TTA, weights, thresholds). A file of schema version 1 or 2
    carries no digest and is refused with the fix."""
    for where, external, rows in _row_sets(scores):
        for name, row in rows.items():
            location = f"{where}scores.{name}"
            if row.digest is None:
                if scores.schema_version < FIRST_VERIFIABLE_VERSION:
                    raise ContractError(
                        f"{path} is a scores file of schema version {scores.schema_version}, written before each "
                        "row carried a digest of what it scored: an edit to it (ensemble weights, TTA, a threshold) "
                        f"could not be detected, so it is not served. {RE_EVALUATE}"
                    )
                raise ContractError(f"{path}: {location} has no digest (removed by an edit?). {RE_EVALUATE}")
            covered = _covered(scores, name, row, external)
            if sha256_of(covered) == row.digest.sha256:
                continue
            named = [_describe(f, where, name) for f in changed_fields(covered, row.digest.fields)]
            raise ContractError(
                f"{path} is not the file evaluate.py wrote: {'; '.join(named) or 'the content of ' + location} "
                f"changed since (the digest in {location} no longer matches). The digest catches mistakes and edits; "
                f"it is not a signature. {RE_EVALUATE}"
            )
