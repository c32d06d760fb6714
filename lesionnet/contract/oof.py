"""``lesionnet oof``'s ``oof_scores.json``: the cross-validation figures of a sweep and the values fitted on its
out-of-fold predictions, written and read only here (computed by ``lesionnet.evaluation.oof``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from lesionnet.contract.files import read_json, write_json
from lesionnet.contract.scores import ScoresRow

OOF_VERSION = 1
RERUN = "Re-run `lesionnet oof sweep=<the sweep>` with this LesionNet version."


class FoldRun(BaseModel):
    """One fold: its run, the checkpoint that predicted its held-out images, and its scores on them."""

    model_config = ConfigDict(extra="forbid")

    fold: int
    run: str
    checkpoint: str
    sha256: str
    epoch: int | None
    n_images: int
    n_lesions: int
    scores: dict[str, float | None]  # the CV metrics on the fold's held-out images


class MeanSd(BaseModel):
    """Mean and sample standard deviation (ddof=1) of one metric over the folds where it is defined."""

    model_config = ConfigDict(extra="forbid")

    mean: float | None
    sd: float | None
    n_folds: int


class FittedValue(BaseModel):
    """A value fitted on data, with what it was fitted on and which model it is meant for."""

    model_config = ConfigDict(extra="forbid")

    value: float
    fitted_on: str
    applies_to: str


class OofScores(BaseModel):
    """The whole ``oof_scores.json``."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = OOF_VERSION
    sweep: str
    folds: int
    split_seed: int
    n_images: int
    n_lesions: int
    class_names: list[str]
    runs: list[FoldRun]
    cv: dict[str, MeanSd]  # over folds
    pooled: ScoresRow  # all out-of-fold predictions at once (evaluate.py's score(): CIs resample lesions)
    temperature: FittedValue
    melanoma_threshold: FittedValue | None
    mel_target_sensitivity: float
    approximation: str
    test_command: str


def write_oof_scores(scores: OofScores, path: str | Path) -> Path:
    """Atomically write oof_scores.json."""
    return write_json(scores, path)


def read_oof_scores(path: str | Path) -> OofScores:
    """oof_scores.json at this version; any problem is a ContractError naming the file and the fix."""
    return read_json(OofScores, path, OOF_VERSION, "out-of-fold scores file", RERUN)
