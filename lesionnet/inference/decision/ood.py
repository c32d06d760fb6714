"""Refuse what is not a dermatoscope image: an out-of-distribution (OOD) score on the model's pooled features.

Why feature space: the max-softmax / energy gate works on the classifier's output, and a classifier trained only on
lesions maps a cat or a flower onto some lesion class with high confidence (issue 11: 8 of 9 ordinary photos were
answered as lesions). The pooled pre-logit features keep much more of what the image looks like, so a distance
from the validation lesions' features separates "not a lesion" far better. Methods (scores: higher = stranger):

* ``mahalanobis``: squared Mahalanobis distance of the L2-normalised feature to the validation mean, one Gaussian
  with a Ledoit-Wolf shrunk covariance (D can exceed the number of validation images, so the sample covariance
  alone is singular).
* ``mahalanobis_class``: Lee et al. 2018: one mean per class, a shared (pooled within-class) shrunk covariance,
  the smallest distance over the classes.
* ``knn``: Sun et al. 2022: cosine distance to the k-th nearest validation feature (features L2-normalised).

Both Mahalanobis variants are ``(z - m) P (z - m)'`` with the stored means ``m`` and precision ``P``, computed by one
torch function (:func:`mahalanobis_scores`) on the server (float64) and in the exported ONNX graph of the on-device
mode (float32, ``lesionnet.export``); kNN would need every reference feature (N x D) in the graph and is not exported.

The threshold is the ``quantile`` (default 0.95: about 5% of lesion images refused) of OUT-OF-SAMPLE validation
scores: each image is scored by a detector that did not see its lesion (grouped folds for Mahalanobis; for kNN the
neighbours of the same lesion are skipped). In-sample scores are biased low (an image is close to the mean it helped
estimate and is its own nearest neighbour; HAM10000 has up to 6 images of one lesion), which would put the
threshold too low and refuse many more than 5% of new lesion images. The stored detector is refitted on all the
validation images, with a little less shrinkage than the folds had (Ledoit-Wolf shrinks less as N grows), so it
scores new lesions slightly higher than the folds did: negligible with the whole validation split (Lite0 after
2 epochs, 1280-D, 1,513 images: 24/500 = 4.8% of test lesion images refused at the 95% quantile), not with a few
hundred (500 images: 7.6%, and 5.6-8.6% over four random samples). Fit it on the whole validation split.

The fitted gate is a typed JSON file (``lesionnet.contract.gates.OodGateFile``, arrays as base64 float32) with the
model version it was fitted for; :meth:`OodGate.load` refuses a file fitted for another model or TTA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from scipy.linalg import cho_factor, cho_solve
from scipy.stats import rankdata

from lesionnet.contract.files import ContractError
from lesionnet.contract.gates import OOD_METHODS as OOD_METHODS  # the methods a gate file may name
from lesionnet.contract.gates import REFIT_OOD as REFIT
from lesionnet.contract.gates import (
    OodGateFile,
    OodMethod,
    StoredArray,
    check_fitted_for,
    read_ood_gate,
    write_ood_gate,
)

if TYPE_CHECKING:  # the core's outputs, read here; the core imports this package's combine (see __init__)
    from lesionnet.inference.predictor import Prediction, Predictor

DEFAULT_QUANTILE = 0.95
_KNN_CHUNK = 1024  # query rows per similarity block: bounds memory at chunk x N floats
_MAHALANOBIS_CHUNK = 256  # rows per block: the differences to the class means take chunk x C x D floats


# ----------------------------------------------------------------------------- statistics


def l2_normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float64): the distances then depend on the direction of a feature, not its size."""
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"Expected features of shape (N, D), got {array.shape}.")
    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)


def ledoit_wolf(residuals: np.ndarray) -> tuple[np.ndarray, float]:
    """(shrunk covariance, shrinkage) of centred rows, Ledoit & Wolf 2004 as scikit-learn's ``LedoitWolf(
    assume_centered=True)`` computes it; numpy only, so the app needs no scikit-learn (a test compares the two)."""
    x = np.asarray(residuals, dtype=np.float64)
    n, d = x.shape
    emp_cov = x.T @ x / n
    mu = float(np.trace(emp_cov)) / d
    x2 = x**2
    beta_ = float((x2.T @ x2).sum())
    delta_ = float((emp_cov**2).sum())
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * float(np.trace(emp_cov)) + d * mu**2) / d
    shrinkage = 0.0 if delta <= 0 else min(beta, delta) / delta
    cov = (1.0 - shrinkage) * emp_cov
    cov[np.diag_indices(d)] += shrinkage * mu
    return cov, shrinkage


def mahalanobis_scores(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(N,) smallest squared Mahalanobis distance of the L2-normalised rows of ``features`` (N, D) to the rows of
    ``means`` (C, D) under ``precision`` (D, D). The one formula of the server (float64, through
    :meth:`OodDetector.score`) and of the exported ONNX graph (float32). Written as ``(z - m) P (z - m)'`` per mean,
    not as the expansion ``z P z' - 2 z P m' + m P m'``, whose terms are far larger than the distance and cancel
    badly in float32."""
    z = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    diff = z[:, None, :] - means[None, :, :]
    return ((diff @ precision) * diff).sum(dim=-1).amin(dim=1).clamp_min(0.0)


def _precision(cov: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric covariance: Cholesky (5x faster than eigh at D=1280), else eigenvalues floored so a
    singular one (no shrinkage, fewer images than dimensions) still inverts."""
    try:
        inverse = cho_solve(cho_factor(cov, lower=True, check_finite=False), np.eye(len(cov)), check_finite=False)
        return (inverse + inverse.T) / 2
    except np.linalg.LinAlgError:
        pass
    values, vectors = np.linalg.eigh(cov)
    values = np.maximum(values, max(float(values.max()), 1e-12) * 1e-9)
    return (vectors / values) @ vectors.T


def quantile_threshold(scores: np.ndarray, quantile: float) -> float:
    """The score above which an image is refused: ``quantile`` of in-distribution scores (higher = stranger)."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}; 0.95 refuses about 5% of lesion images.")
    if len(scores) == 0:
        raise ValueError("No validation scores to set the OOD threshold on.")
    return float(np.quantile(np.asarray(scores, dtype=np.float64), quantile))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion: unlike the normal approximation it stays inside [0, 1] and is not
    empty at 0/n or n/n, which is exactly where a refusal rate of photos lands."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"Need 0 <= successes <= n and n > 0, got {successes}/{n}.")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    return low, 1.0 if successes == n else min(1.0, centre + half)


def ood_auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(an OOD image scores higher than an in-distribution one), ties counted half (Mann-Whitney). Rank-based on
    purpose: torchmetrics squashes scores outside [0, 1] through a sigmoid, which ties large distances."""
    inside, outside = np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)
    if len(inside) == 0 or len(outside) == 0:
        raise ValueError("AUROC needs in-distribution and OOD scores, got an empty set.")
    ranks = rankdata(np.concatenate([inside, outside]))
    n_out = len(outside)
    return float((ranks[len(inside) :].sum() - n_out * (n_out + 1) / 2) / (n_out * len(inside)))


# ----------------------------------------------------------------------------- detector


@dataclass(frozen=True)
class OodDetector:
    """A fitted score function without threshold: what the folds refit and what the exported on-device graph embeds.
    Arrays are float32, as stored, so a saved and loaded detector scores bit-identically."""

    method: str
    labels: tuple[str, ...] = ()  # one per row of ``means`` (``all`` for one Gaussian)
    means: np.ndarray | None = None  # (C, D)
    precision: np.ndarray | None = None  # (D, D)
    references: np.ndarray | None = None  # (N, D) L2-normalised validation features (kNN)
    k: int = 1
    shrinkage: float | None = None

    @property
    def dim(self) -> int:
        reference = self.references if self.method == "knn" else self.means
        # None when a file lacks its method's arrays: the AttributeError is what OodGate.load reports
        return int(cast(np.ndarray, reference).shape[1])

    @cached_property
    def _float64_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The means and precision as float64 tensors, converted once (a 1280 x 1280 copy per request cost ~ms)."""
        means, precision = cast(np.ndarray, self.means), cast(np.ndarray, self.precision)  # set for Mahalanobis
        return torch.from_numpy(means.astype(np.float64)), torch.from_numpy(precision.astype(np.float64))

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N,) OOD scores of pooled features (any scale: they are L2-normalised here); higher = stranger."""
        z = l2_normalise(features)
        if z.shape[1] != self.dim:
            raise ValueError(
                f"Features of dimension {z.shape[1]} given to an OOD gate fitted on dimension {self.dim}: "
                "the gate belongs to another model. Refit it for this model."
            )
        if self.method == "knn":
            references = cast(np.ndarray, self.references)  # set for kNN
            return 1.0 - _kth_similarity(z, references.astype(np.float64), self.k)
        means, precision = self._float64_arrays
        blocks = [
            mahalanobis_scores(torch.from_numpy(z[start : start + _MAHALANOBIS_CHUNK]), means, precision)
            for start in range(0, len(z), _MAHALANOBIS_CHUNK)
        ]
        return torch.cat(blocks).numpy() if blocks else np.empty(0)


def _kth_similarity(
    queries: np.ndarray,
    references: np.ndarray,
    k: int,
    query_groups: np.ndarray | None = None,
    reference_groups: np.ndarray | None = None,
) -> np.ndarray:
    """Cosine similarity of each query to its k-th most similar reference; with groups given, references of the
    query's own group (lesion) are skipped: leave-one-lesion-out."""
    out = np.empty(len(queries))
    for start in range(0, len(queries), _KNN_CHUNK):
        sims = queries[start : start + _KNN_CHUNK] @ references.T
        if query_groups is not None and reference_groups is not None:
            sims[query_groups[start : start + _KNN_CHUNK, None] == reference_groups[None, :]] = -np.inf
        out[start : start + _KNN_CHUNK] = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
    return out


def fit_detector(features: np.ndarray, method: str, labels: Sequence[Any] | None = None, k: int = 1) -> OodDetector:
    """Fit ``method`` on in-distribution features (``labels``: the class of each row, for ``mahalanobis_class``)."""
    if method not in OOD_METHODS:
        raise ValueError(f"Unknown OOD method '{method}'; use one of {list(OOD_METHODS)}.")
    z = l2_normalise(features)
    if method == "knn":
        if not 1 <= k < len(z):
            raise ValueError(f"k={k} needs more than {k} validation images, got {len(z)}: lower k or add images.")
        return OodDetector(method, references=z.astype(np.float32), k=k)
    if method == "mahalanobis_class":
        if labels is None or len(labels) != len(z):
            raise ValueError("mahalanobis_class needs one class label per validation image (labels=...).")
        names = np.asarray([str(label) for label in labels])
        classes = tuple(sorted(set(names)))
        means = np.stack([z[names == c].mean(axis=0) for c in classes])
        residuals = z - means[np.searchsorted(classes, names)]
    else:
        classes, means = ("all",), z.mean(axis=0, keepdims=True)
        residuals = z - means
    cov, shrinkage = ledoit_wolf(residuals)
    return OodDetector(
        method,
        labels=classes,
        means=means.astype(np.float32),
        precision=_precision(cov).astype(np.float32),
        shrinkage=shrinkage,
    )


def _fold_of_groups(groups: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Fold index per row; all rows of a group (a lesion) in one fold, groups shuffled with a fixed seed."""
    unique, index = np.unique(groups, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    return (order % folds)[index]


def out_of_sample_scores(
    features: np.ndarray,
    method: str,
    labels: Sequence[Any] | None = None,
    groups: Sequence[Any] | None = None,
    folds: int = 5,
    k: int = 1,
) -> np.ndarray:
    """Each row's score from a detector that never saw its group: kNN skips same-group neighbours, Mahalanobis is
    refitted on the other ``folds - 1`` folds. ``groups`` default: every image its own group."""
    z = l2_normalise(features)
    group_ids = np.asarray([str(g) for g in groups]) if groups is not None else np.arange(len(z)).astype(str)
    if len(group_ids) != len(z):
        raise ValueError(f"{len(group_ids)} groups for {len(z)} feature rows: give one group (lesion id) per image.")
    if method == "knn":
        fit_detector(z, method, k=k)  # validates k
        return 1.0 - _kth_similarity(z, z, k, query_groups=group_ids, reference_groups=group_ids)
    if len(np.unique(group_ids)) < folds or folds < 2:
        raise ValueError(f"{folds} folds need at least {folds} lesions (groups), got {len(np.unique(group_ids))}.")
    fold = _fold_of_groups(group_ids, folds)
    label_array = None if labels is None else np.asarray([str(label) for label in labels])
    scores = np.empty(len(z))
    for f in range(folds):
        train = fold != f
        detector = fit_detector(z[train], method, None if label_array is None else label_array[train], k)
        scores[~train] = detector.score(z[~train])
    return scores


# ----------------------------------------------------------------------------- gate (its file: contract.gates)


@dataclass(frozen=True)
class OodGate:
    """Refuse an image whose feature-space score is above ``threshold`` (fitted on validation, for one model)."""

    detector: OodDetector
    threshold: float
    quantile: float
    model_version: str
    tta: str
    n_images: int
    n_groups: int
    folds: int | None
    validation_scores: np.ndarray = field(repr=False)
    source: str = ""

    @property
    def method(self) -> str:
        return self.detector.method

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N,) scores of pooled features (``Prediction.features``); higher = less like a validation lesion."""
        return self.detector.score(features)

    def refuses(self, features: np.ndarray) -> np.ndarray:
        """(N,) True where the image is to be refused as not a dermatoscope image."""
        return self.refuses_score(self.score(features))

    def refuses_score(self, scores: np.ndarray) -> np.ndarray:
        """(N,) True where a score (:meth:`score`) is above the threshold: the one refusal rule."""
        return np.asarray(scores) > self.threshold

    @cached_property
    def _sorted_validation_scores(self) -> np.ndarray:
        return np.sort(self.validation_scores)

    def percentile_of(self, scores: np.ndarray) -> np.ndarray:
        """(N,) share of validation lesion images scoring at or below each score (1.0 = stranger than all)."""
        ordered = self._sorted_validation_scores
        return np.searchsorted(ordered, scores, side="right") / len(ordered)

    def percentile(self, features: np.ndarray) -> np.ndarray:
        """(N,) :meth:`percentile_of` the scores of pooled features."""
        return self.percentile_of(self.score(features))

    def to_file(self) -> OodGateFile:
        d = self.detector
        return OodGateFile(
            method=cast(OodMethod, d.method),  # fit_detector checked it; pydantic checks it again
            model_version=self.model_version,
            tta=self.tta,
            threshold=self.threshold,
            quantile=self.quantile,
            n_images=self.n_images,
            n_groups=self.n_groups,
            folds=self.folds,
            k=d.k if d.method == "knn" else None,
            shrinkage=d.shrinkage,
            labels=list(d.labels),
            means=None if d.means is None else StoredArray.of(d.means),
            precision=None if d.precision is None else StoredArray.of(d.precision),
            references=None if d.references is None else StoredArray.of(d.references),
            validation_scores=[float(s) for s in self.validation_scores],
            source=self.source,
        )

    def save(self, path: str | Path) -> Path:
        """Atomically (a server starting at the same time never reads half a file)."""
        return write_ood_gate(self.to_file(), path)

    @classmethod
    def load(cls, path: str | Path, model_version: str, tta: str | None = None) -> OodGate:
        """The gate in ``path``; refused unless fitted for ``model_version`` (``Predictor.version``) and ``tta``."""
        stored = read_ood_gate(path)
        why = "its distances mean nothing for another model's features"
        check_fitted_for(path, (stored.model_version, stored.tta), (model_version, tta), why, REFIT)
        try:
            detector = OodDetector(
                method=stored.method,
                labels=tuple(stored.labels),
                means=None if stored.means is None else stored.means.array(),
                precision=None if stored.precision is None else stored.precision.array(),
                references=None if stored.references is None else stored.references.array(),
                k=stored.k or 1,
                shrinkage=stored.shrinkage,
            )
            detector.dim  # noqa: B018 -- the arrays the method needs are present
        except (ValueError, AttributeError) as err:
            raise ContractError(f"{path} is not a valid OOD gate file ({err}). {REFIT}") from err
        return cls(
            detector=detector,
            threshold=stored.threshold,
            quantile=stored.quantile,
            model_version=stored.model_version,
            tta=stored.tta,
            n_images=stored.n_images,
            n_groups=stored.n_groups,
            folds=stored.folds,
            validation_scores=np.asarray(stored.validation_scores, dtype=np.float64),
            source=stored.source,
        )


def fit_ood_features(
    features: np.ndarray,
    method: str = "mahalanobis",
    *,
    model_version: str,
    tta: str = "none",
    labels: Sequence[Any] | None = None,
    groups: Sequence[Any] | None = None,
    quantile: float = DEFAULT_QUANTILE,
    folds: int = 5,
    k: int = 1,
) -> OodGate:
    """The gate from validation features: detector on all of them, threshold on their out-of-sample scores."""
    validation_scores = out_of_sample_scores(features, method, labels, groups, folds, k)
    threshold = quantile_threshold(validation_scores, quantile)
    n_groups = len(set(map(str, groups))) if groups is not None else len(features)
    return OodGate(
        detector=fit_detector(features, method, labels, k),
        threshold=threshold,
        quantile=quantile,
        model_version=model_version,
        tta=tta,
        n_images=len(features),
        n_groups=n_groups,
        folds=None if method == "knn" else folds,
        validation_scores=validation_scores,
        source=f"{quantile:.0%} quantile of out-of-sample scores of {len(features)} validation images "
        f"({n_groups} lesions)",
    )


def fit_ood(
    predictor: Predictor,
    paths: Sequence[str | Path],
    method: str = "mahalanobis",
    *,
    labels: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    quantile: float = DEFAULT_QUANTILE,
    folds: int = 5,
    k: int = 1,
    batch_size: int = 32,
    prediction: Prediction | None = None,
) -> OodGate:
    """Fit the gate on validation image files of the training run (``groups``: their lesion ids, so images of one
    lesion never vouch for each other; ``labels``: their dx, for ``mahalanobis_class``, else the predicted class).
    ``prediction``: the predictor's outputs for exactly ``paths``, when a shared pass already has them."""
    if not paths:
        raise ValueError("No validation images to fit the OOD gate on: give the run's validation split.")
    if prediction is None:
        prediction = predictor.predict_paths(paths, batch_size=batch_size, desc="OOD fit")
    elif len(prediction) != len(paths):
        raise ValueError(f"The prediction holds {len(prediction)} images, not the {len(paths)} paths given.")
    if method == "mahalanobis_class" and labels is None:
        labels = [predictor.class_names[i] for i in prediction.probs.argmax(axis=1)]
    return fit_ood_features(
        prediction.features,
        method,
        model_version=predictor.version,
        tta=predictor.tta,
        labels=labels,
        groups=groups,
        quantile=quantile,
        folds=folds,
        k=k,
    )
