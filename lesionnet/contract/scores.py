"""evaluate.py's ``scores.json``: what was scored, by which checkpoints (by sha256), with which TTA and weights.

Written once by evaluate.py (:func:`write_scores`), read by the app (:func:`read_scores`), which serves a scores file
only for exactly the checkpoints, TTA and ensemble weights it was computed with (:func:`scores_for`).

Every row (a checkpoint, the ensemble, a ``+posthoc-la`` row) is a typed :class:`ScoresRow`, read by attribute:
a bad value (a temperature of "hot") is refused when the file is read, with its path and the fix.

Version 2 adds ``external`` (the external sets scored in the same run, each with its own rows) and
``classes_present``; a version 1 file is the same document without them and is still read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator

from lesionnet.contract.files import ContractError, read_json, write_json

SCORES_VERSION = 2
READABLE_SCORES_VERSIONS: tuple[int, ...] = (1, SCORES_VERSION)  # 1: before external sets (a subset of 2)
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


class ScoresRow(BaseModel):
    """The scores of one row (a checkpoint, the ensemble, or either with post-hoc logit adjustment) on one set."""

    model_config = ConfigDict(extra="forbid")

    n: int
    accuracy: float
    balanced_accuracy: float | None  # mean recall over the classes the set has
    macro_f1: float | None
    macro_auroc: float | None
    log_loss: float
    ece: float
    per_class: dict[str, ClassScores]
    confusion_matrix: list[list[int]]  # rows: true class
    melanoma: MelanomaScores | None = None  # None: the model has no melanoma class
    # 95% intervals of accuracy, balanced_accuracy and, where defined, mel_auroc, mel_sensitivity, mel_specificity
    ci95: dict[str, Interval] = {}
    validation: ValidationFigures | None = None  # None: no validation split (nothing was chosen or fitted)
    temperature: float | None = None  # fitted on validation
    ece_after_temperature: float | None = None
    log_loss_after_temperature: float | None = None
    logit_adjustment: FittedAdjustment | None = None  # the ``+posthoc-la`` rows only
    # accuracy on images whose lesion trained the model vs the rest (the seed's image-level split only)
    seen_lesions: dict[str, GroupFigures] | None = None

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
    return write_json(scores, path)


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
