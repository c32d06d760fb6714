"""The one prediction path: images -> each member's eval transform -> forward (TTA) -> weighted ensemble.

evaluate.py (image files), the app (uploads), export (parity) and the benchmarks all predict through
:class:`Predictor`, so a threshold chosen by evaluate.py on validation means the same thing in the app. The forward
pass is split the timm way (``forward_features`` -> pooled features -> classifier), so the pooled features and the
last feature map come out of the same pass as the logits, for out-of-distribution scores and class activation maps.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lesionnet.contract.scores import LogitAdjustment
from lesionnet.data.image_dataset import LesionImageDataset
from lesionnet.data.transforms import build_eval_transform
from lesionnet.inference.checkpoints import CheckpointError, Member, same_classes
from lesionnet.inference.decision.combine import combine
from lesionnet.models.factory import timm_model

# Dermoscopy has no canonical orientation, so flips and 90-degree turns keep the label.
TTA_MODES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = {
    "none": (lambda x: x,),
    "flips": (lambda x: x, lambda x: x.flip(3), lambda x: x.flip(2), lambda x: x.flip(2, 3)),
    "d4": (
        lambda x: x,
        lambda x: x.flip(3),
        lambda x: x.flip(2),
        lambda x: x.flip(2, 3),
        lambda x: x.transpose(2, 3),
        lambda x: x.transpose(2, 3).flip(3),
        lambda x: x.transpose(2, 3).flip(2),
        lambda x: x.transpose(2, 3).flip(2, 3),
    ),
}


def tta_views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The test-time views of a batch (NCHW): ``none``, ``flips`` (4) or ``d4`` (8: flips and transposes)."""
    if mode not in TTA_MODES:
        raise ValueError(f"Unknown tta '{mode}'; use one of {list(TTA_MODES)}.")
    return [view(images) for view in TTA_MODES[mode]]


@dataclass(frozen=True)
class ForwardOutput:
    """One forward pass of one member on one view: logits, pooled features and the last spatial feature map."""

    logits: torch.Tensor  # (N, K)
    features: torch.Tensor  # (N, D) what the classifier sees (pre-logits)
    feature_map: torch.Tensor  # (N, C, H, W) the backbone's last feature map
    stage_stats: torch.Tensor | None = None  # (N, S) :func:`stage_statistics`; None when the network has no stages


def forward(member: Member, images: torch.Tensor) -> ForwardOutput:
    """The member's network on a preprocessed batch; ``logits`` equal ``member.model(images)`` in eval mode."""
    classifier = member.model
    images = classifier.colour_constancy(images)
    if classifier.hparams.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    network = timm_model(classifier.model)
    stage_stats = None
    if hasattr(network, "forward_intermediates"):  # timm backbones: the same pass, with each stage's output
        feature_map, stages = network.forward_intermediates(images)
        stage_stats = stage_statistics(stages)
    else:
        feature_map = network.forward_features(images)
    features = network.forward_head(feature_map, pre_logits=True)
    return ForwardOutput(
        logits=network.get_classifier()(features), features=features, feature_map=feature_map, stage_stats=stage_stats
    )


def stage_statistics(stages: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, S) each stage's channel means and standard deviations over the image: colour and texture statistics at
    every scale of the backbone (what kind of picture it is), where the pooled last features say what lesion it is.
    Read by the image-type gate (``lesionnet.inference.decision.image_type``)."""
    return torch.cat([torch.cat([s.float().mean((2, 3)), s.float().std((2, 3))], dim=1) for s in stages], dim=1)


def has_linear_gap_head(member: Member) -> bool:
    """Whether the head is global average pooling + one linear layer: then the class activation map (CAM) of the last
    feature map equals Grad-CAM up to ReLU and scaling, and needs no backward pass. Checked on a probe input rather
    than by model name (the baseline CNN and VGG pool to a grid and add dense layers: they are not)."""
    network = member.model.model
    if not isinstance(timm_model(network).get_classifier(), torch.nn.Linear):
        return False
    probe = torch.randn(1, *member.data_config["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = forward(member, probe.to(next(network.parameters()).device))
    if out.feature_map.ndim != 4 or out.feature_map.shape[1] != out.features.shape[1]:
        return False
    pooled = out.feature_map.float().mean(dim=(2, 3))
    return torch.allclose(pooled, out.features.float(), atol=1e-5, rtol=1e-4)


def class_activation_maps(member: Member, feature_map: torch.Tensor) -> torch.Tensor:
    """(N, K, h, w) maps whose spatial mean plus the bias is each class's logit (Zhou et al. 2016)."""
    head = timm_model(member.model.model).get_classifier()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{member.name} has no linear classifier: class activation maps need one.")
    weight = head.weight.float()
    return torch.einsum("kc,nchw->nkhw", weight, feature_map.float())


@dataclass(frozen=True)
class ImageOutput:
    """One image's share of a :class:`Prediction`."""

    probs: np.ndarray  # (K,)
    msp: float
    neg_energy: float
    features: np.ndarray  # (D,)
    cams: np.ndarray | None = None  # (K, h, w) the first member's class activation maps, when asked for
    stage_stats: np.ndarray | None = None  # (S,) the first member's :func:`stage_statistics`


@dataclass(frozen=True)
class Prediction:
    """Outputs for a batch of N images (numpy, float64): the ensemble and each member."""

    probs: np.ndarray  # (N, K) weighted mean over members of the mean softmax over TTA views
    member_probs: np.ndarray  # (M, N, K)
    neg_energy: np.ndarray  # (N,) logsumexp of the logits, averaged over members and views (higher = familiar)
    features: np.ndarray  # (N, D) the first member's pooled features, mean over TTA views
    cams: np.ndarray | None = None  # (N, K, h, w) the first member's class activation maps (identity view)
    stage_stats: np.ndarray | None = None  # (N, S) the first member's stage statistics, mean over TTA views

    @property
    def msp(self) -> np.ndarray:
        """Max softmax probability per image (Hendrycks & Gimpel 2017)."""
        return self.probs.max(axis=1)

    def __len__(self) -> int:
        return len(self.probs)

    def rows(self, stop: int) -> Prediction:
        """The first ``stop`` images' share (e.g. the capped set one gate is fitted on, out of a shared pass)."""
        return Prediction(
            probs=self.probs[:stop],
            member_probs=self.member_probs[:, :stop],
            neg_energy=self.neg_energy[:stop],
            features=self.features[:stop],
            cams=None if self.cams is None else self.cams[:stop],
            stage_stats=None if self.stage_stats is None else self.stage_stats[:stop],
        )

    def image(self, index: int) -> ImageOutput:
        return ImageOutput(
            probs=self.probs[index],
            msp=float(self.probs[index].max()),
            neg_energy=float(self.neg_energy[index]),
            features=self.features[index],
            cams=None if self.cams is None else self.cams[index],
            stage_stats=None if self.stage_stats is None else self.stage_stats[index],
        )


def normalise_weights(weights: Sequence[float] | None, n_members: int) -> np.ndarray:
    """Ensemble weights as a probability vector (None = equal weights); negative or all-zero weights are refused."""
    if weights is None:
        return np.full(n_members, 1.0 / n_members)
    array = np.asarray(weights, dtype=np.float64)
    if array.shape != (n_members,) or (array < 0).any() or array.sum() <= 0:
        raise CheckpointError(
            f"Ensemble weights {list(weights)} do not fit {n_members} model(s): one non-negative weight per model."
        )
    return array / array.sum()


def check_logit_adjustment(adjustment: LogitAdjustment | Mapping[str, Any] | None) -> LogitAdjustment | None:
    """Tau and training prior as evaluate.py fits them (scores.json ``logit_adjustment``), checked once here."""
    if adjustment is None or isinstance(adjustment, LogitAdjustment):
        return adjustment
    try:
        return LogitAdjustment.model_validate(dict(adjustment))
    except ValidationError as err:
        raise CheckpointError(
            f"Post-hoc logit adjustment {dict(adjustment)} needs a number tau and a prior of positive class "
            f"frequencies, as evaluate.py posthoc_logit_adjustment=true writes them in scores.json: {err}"
        ) from err


class Predictor:
    """Members loaded once, each with its own preprocessing; ``lock`` serialises passes that hook into modules.

    ``logit_adjustment`` (tau and training prior, fitted on validation by evaluate.py) turns the averaged probabilities
    into softmax(log p - tau log prior): the reading of the model its scores.json row was measured with.
    """

    def __init__(
        self,
        members: Sequence[Member],
        tta: str = "none",
        weights: Sequence[float] | None = None,
        logit_adjustment: LogitAdjustment | Mapping[str, Any] | None = None,
    ) -> None:
        if not members:
            raise CheckpointError("No model to predict with.")
        tta_views(torch.zeros(1, 3, 2, 2), tta)  # validates the mode now, not at the first image
        self.members = list(members)
        self.class_names = same_classes(self.members)
        self.tta = tta
        self.weights = normalise_weights(weights, len(self.members))
        self.logit_adjustment = check_logit_adjustment(logit_adjustment)
        if self.logit_adjustment is not None and len(self.logit_adjustment.prior) != len(self.class_names):
            raise CheckpointError(
                f"Post-hoc logit adjustment has a prior of {len(self.logit_adjustment.prior)} class frequencies, the "
                f"model has {len(self.class_names)} classes: pass the scores.json evaluate.py wrote for this model."
            )
        self.transforms = [build_eval_transform(m.data_config) for m in self.members]
        self.device = next(self.members[0].model.parameters()).device
        self.lock = threading.Lock()
        self._cam_available: bool | None = None

    def preprocess(self, index: int, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 arrays -> member ``index``'s normalised (N, 3, h, w) batch on the device."""
        batch = torch.stack([self.transforms[index](image=image)["image"] for image in images])
        return batch.to(self.device)

    @property
    def cam_available(self) -> bool:
        """Whether the first member's head lets class activation maps come out of the forward pass (else Grad-CAM)."""
        if self._cam_available is None:
            self._cam_available = has_linear_gap_head(self.members[0])
        return self._cam_available

    @torch.inference_mode()
    def _member_pass(self, index: int, batch: torch.Tensor, cams: bool = False) -> tuple[torch.Tensor, ...]:
        """(mean softmax, mean logsumexp, mean pooled features, mean stage statistics ((N, 0) for a network without
        stages) over the TTA views[, CAMs of the identity view])."""
        outputs = [forward(self.members[index], view) for view in tta_views(batch, self.tta)]
        probs = torch.stack([o.logits.float().softmax(dim=-1) for o in outputs]).mean(0)
        energy = torch.stack([torch.logsumexp(o.logits.float(), dim=-1) for o in outputs]).mean(0)
        features = torch.stack([o.features.float() for o in outputs]).mean(0)
        stats = [o.stage_stats for o in outputs if o.stage_stats is not None]
        stage_stats = torch.stack(stats).mean(0) if len(stats) == len(outputs) else features.new_zeros(len(features), 0)
        result: tuple[torch.Tensor, ...] = (
            probs.double().cpu(),
            energy.double().cpu(),
            features.double().cpu(),
            stage_stats.double().cpu(),
        )
        if cams:  # the first view is the identity: its maps line up with the image
            result += (class_activation_maps(self.members[index], outputs[0].feature_map).double().cpu(),)
        return result

    def _combine(self, passes: list[tuple[torch.Tensor, ...]]) -> Prediction:
        member_probs = torch.stack([p[0] for p in passes]).numpy()
        probs = combine(list(member_probs), self.weights.tolist(), self.logit_adjustment)
        energy = torch.stack([p[1] for p in passes]).mean(0).numpy()
        cams = passes[0][4].numpy() if len(passes[0]) > 4 else None
        stage_stats = passes[0][3].numpy() if passes[0][3].shape[1] else None
        return Prediction(
            probs=probs,
            member_probs=member_probs,
            neg_energy=energy,
            features=passes[0][2].numpy(),
            cams=cams,
            stage_stats=stage_stats,
        )

    def predict_arrays(self, images: Sequence[np.ndarray], cams: bool = False) -> Prediction:
        """Predictions for decoded RGB uint8 arrays (H, W, 3) of any size, as one batch; ``cams`` adds the first
        member's class activation maps from the same pass (only for heads where :attr:`cam_available`)."""
        if cams and not self.cam_available:
            raise ValueError(
                f"{self.members[0].name} has no global-average-pool + linear head: its heatmaps need Grad-CAM."
            )
        passes = [self._member_pass(i, self.preprocess(i, images), cams and i == 0) for i in range(len(self.members))]
        return self._combine(passes)

    def predict_paths(
        self, paths: Sequence[str | Path], batch_size: int = 64, num_workers: int = 0, desc: str = "predict"
    ) -> Prediction:
        """Predictions for image files, decoded by the training reader and batched ``batch_size`` at a time."""
        passes = []
        for index, member in enumerate(self.members):
            dataset = LesionImageDataset([str(p) for p in paths], [0] * len(paths), self.transforms[index])
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
            batches = [
                self._member_pass(index, images.to(self.device))
                for images, _ in tqdm(loader, desc=f"{member.name} {desc}", unit="batch", leave=False)
            ]
            passes.append(tuple(torch.cat(parts) for parts in zip(*batches, strict=True)))
        return self._combine(passes)

    @property
    def version(self) -> str:
        """The served model's identity: member names, then a hash of their checkpoints' sha256, weights and TTA (the
        averaged views give other probabilities: a gate fitted without TTA does not hold with it)."""
        identity = "".join(m.sha256 for m in self.members) + ",".join(f"{w:.6f}" for w in self.weights)
        identity += f"tta:{self.tta}"
        if self.logit_adjustment is not None:  # another reading of the same weights: gates fitted for it differ
            identity += f"la{self.logit_adjustment.tau:.4f}:" + ",".join(
                f"{p:.6f}" for p in self.logit_adjustment.prior
            )
        return f"{'+'.join(m.name for m in self.members)}@{hashlib.sha256(identity.encode()).hexdigest()[:12]}"

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "checkpoints": [m.describe() for m in self.members],
            "weights": [round(float(w), 6) for w in self.weights],
            "class_names": self.class_names,
            "tta": self.tta,
            "logit_adjustment": None
            if self.logit_adjustment is None
            else {"tau": self.logit_adjustment.tau, "prior": self.logit_adjustment.prior},
            "device": str(self.device),
            "input_sizes": [list(m.data_config["input_size"]) for m in self.members],
        }
