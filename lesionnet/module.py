"""LightningModule wrapping any timm backbone for 7-class lesion classification.

Hyperparameters are plain data (strings, numbers, lists, dicts with Hydra ``_target_``), so a
checkpoint carries everything needed to rebuild the model and its preprocessing and can be read
with ``torch.load(weights_only=True)``; optimizer and scheduler are instantiated from that config.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics as tm
from hydra.utils import instantiate
from lightning.fabric.utilities import AttributeDict
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig, ListConfig, OmegaConf
from timm.data import Mixup
from timm.scheduler.scheduler import Scheduler as TimmScheduler
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassRecall
from torchmetrics.wrappers import ClasswiseWrapper

from lesionnet.classes import CLASS_NAMES
from lesionnet.contract.provenance import Provenance
from lesionnet.finetune import apply_finetune
from lesionnet.models.colour import build_colour_constancy
from lesionnet.models.factory import build_backbone, timm_model

DEFAULT_OPTIMIZER: dict[str, Any] = {
    "_target_": "timm.optim.create_optimizer_v2",
    "_partial_": True,
    "opt": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.05,
}


def plain(value: Any) -> Any:
    """OmegaConf containers -> builtin types (checkpoints must hold plain data only)."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


def build_metrics(class_names: Sequence[str], prefix: str) -> tm.MetricCollection:
    """Accuracy, balanced accuracy (macro recall), macro AUROC and recall per class, all on probabilities."""
    n = len(class_names)
    return tm.MetricCollection(
        {
            "acc": MulticlassAccuracy(n, average="micro"),
            "balanced_acc": MulticlassRecall(n, average="macro"),
            "auroc": MulticlassAUROC(n, average="macro"),
            "recall": ClasswiseWrapper(MulticlassRecall(n, average=None), labels=list(class_names), prefix="recall_"),
        },
        prefix=f"{prefix}/",
        compute_groups=False,  # ClasswiseWrapper must not share state with the macro recall
    )


def check_logit_adjust_tau(
    tau: float, class_prior: Sequence[float] | None, class_weights: Sequence[float] | None, num_classes: int
) -> None:
    """Logit adjustment already balances the classes: it needs the training prior and no class weights on top."""
    if tau < 0:
        raise ValueError(f"logit_adjust_tau must be >= 0, got {tau}.")
    if class_prior is None or len(class_prior) != num_classes or min(class_prior) <= 0:
        raise ValueError(
            f"logit_adjust_tau={tau} needs class_prior: {num_classes} positive training class frequencies "
            "(train.py passes the DataModule's class_prior)."
        )
    if class_weights is not None:
        raise ValueError(
            "logit_adjust_tau > 0 with class weights would correct the imbalance twice: set data.imbalance=none."
        )


def check_distill(distill: Mapping[str, Any]) -> None:
    """``model.distill={teachers: [ckpt, ...], weight: 0.5, temperature: 1.0}``: what distillation needs."""
    if not distill.get("teachers"):
        raise ValueError("model.distill needs teachers: a list of checkpoints (files or train.py run folders).")
    if not 0.0 < float(distill.get("weight", 0.5)) <= 1.0:
        raise ValueError(f"model.distill.weight must be in (0, 1], got {distill.get('weight')}.")
    if float(distill.get("temperature", 1.0)) <= 0:
        raise ValueError(f"model.distill.temperature must be positive, got {distill.get('temperature')}.")


def init_new_classifier(classifier: torch.nn.Module) -> None:
    """Small init for the new 7-class head on a pretrained backbone.

    timm's Google-style init scales by 1/sqrt(num_classes); with 7 classes that gives initial logits
    of several units and a starting loss of 5+, which the first updates then spend undoing.
    """
    for module in classifier.modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            torch.nn.init.trunc_normal_(module.weight, std=0.01)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)


class LesionClassifier(L.LightningModule):
    """timm backbone + cross-entropy (optional class weights, label smoothing) + torchmetrics per stage."""

    # What save_hyperparameters makes of the dict below (Lightning's property allows any MutableMapping).
    hparams: AttributeDict
    # Buffers (register_buffer in __init__), None when not asked for.
    class_weights: torch.Tensor | None
    logit_offsets: torch.Tensor | None

    def __init__(
        self,
        backbone: str = "lesionnet_baseline",
        pretrained: bool = False,
        pretrained_file: str | None = None,
        class_names: Sequence[str] = CLASS_NAMES,
        model_kwargs: Mapping[str, Any] | None = None,
        finetune: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | torch.Tensor | None = None,
        data_config: Mapping[str, Any] | None = None,
        channels_last: bool = False,
        compile: bool = False,
        logit_adjust_tau: float = 0.0,
        class_prior: Sequence[float] | None = None,
        mixup: Mapping[str, Any] | None = None,
        distill: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        if isinstance(class_weights, torch.Tensor):
            class_weights = class_weights.tolist()
        if class_weights is not None and len(class_weights) != len(class_names):
            raise ValueError(f"{len(class_weights)} class weights for {len(class_names)} classes.")
        if logit_adjust_tau:
            check_logit_adjust_tau(logit_adjust_tau, class_prior, class_weights, len(class_names))
        self.save_hyperparameters(
            {
                "backbone": backbone,
                "pretrained": bool(pretrained),
                "pretrained_file": str(pretrained_file) if pretrained_file else None,
                "class_names": list(class_names),
                "model_kwargs": plain(model_kwargs or {}),
                "finetune": plain(finetune or {"policy": "all"}),
                "optimizer": plain(optimizer or DEFAULT_OPTIMIZER),
                "scheduler": plain(scheduler),
                "label_smoothing": float(label_smoothing),
                "class_weights": plain(class_weights),
                "data_config": plain(data_config),
                "channels_last": bool(channels_last),
                "compile": bool(compile),
                "logit_adjust_tau": float(logit_adjust_tau),
                "class_prior": plain(class_prior),
                "mixup": plain(mixup),
                "distill": plain(distill),
            }
        )
        self.model = build_backbone(
            backbone, len(class_names), pretrained, self.hparams.pretrained_file, **self.hparams.model_kwargs
        )
        if pretrained:
            init_new_classifier(timm_model(self.model).get_classifier())
        # The data config's colour constancy is the network's first layer (identity when it asks for none).
        self.colour_constancy = build_colour_constancy(self.hparams.data_config)
        # Freezing happens here, so a checkpoint rebuilt from its hparams has the same frozen parts.
        self.frozen_modules = apply_finetune(self.model, **self.hparams.finetune)
        if channels_last:  # NHWC: ~1.5x faster convolutions on CPU for EfficientNet-style nets
            self.model.to(memory_format=torch.channels_last)
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)
        # Logit adjustment (Menon et al., ICLR 2021): the loss sees f + tau * log(prior), predictions use f alone.
        offsets = logit_adjust_tau * torch.tensor(class_prior, dtype=torch.float32).log() if logit_adjust_tau else None
        self.register_buffer("logit_offsets", offsets, persistent=False)
        self.provenance: Provenance | None = None  # set by training; written into every checkpoint
        # Mixup/CutMix (timm) mixes images and turns targets into soft labels, label smoothing included.
        self.mixup_fn = (
            Mixup(**{**mixup, "label_smoothing": label_smoothing, "num_classes": len(class_names)}) if mixup else None
        )
        if distill:
            check_distill(distill)
        # Each teacher maps the student's batch to its logits: handed over at fit start by lesionnet.training, which
        # loads them (plain list: never trained, never in the checkpoint).
        self.teachers: list[Callable[[torch.Tensor], torch.Tensor]] = []
        # Separate attributes (not a ModuleDict keyed "train": that name is nn.Module.train).
        self.train_metrics = build_metrics(class_names, "train")
        self.val_metrics = build_metrics(class_names, "val")
        self.test_metrics = build_metrics(class_names, "test")
        self._compiled = False

    def describe(self) -> dict[str, Any]:
        """Size figures for the results table. Depth = number of weight layers (Conv2d + Linear)."""
        params = list(self.model.parameters())
        return {
            "params_total": sum(p.numel() for p in params)
            + sum(b.numel() for n, b in self.model.named_buffers() if n.endswith((".weight", ".bias"))),
            "params_trainable": sum(p.numel() for p in params if p.requires_grad),
            "depth": sum(isinstance(m, torch.nn.Conv2d | torch.nn.Linear) for m in self.model.modules()),
            "finetune": self.hparams.finetune.get("policy", "all"),
        }

    def _metrics(self, stage: str) -> tm.MetricCollection:
        return getattr(self, f"{stage}_metrics")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.colour_constancy(x)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, targets = batch
        soft_targets = None
        if stage == "train" and self.mixup_fn is not None:
            images, soft_targets = self.mixup_fn(images, targets)
        logits = self(images)
        trained = logits + self.logit_offsets if self.logit_offsets is not None else logits
        loss = F.cross_entropy(
            trained,
            targets if soft_targets is None else soft_targets,
            weight=self.class_weights,
            label_smoothing=self.hparams.label_smoothing if soft_targets is None else 0.0,  # soft targets have it
        )
        if stage == "train" and self.teachers:
            weight = float(self.hparams.distill.get("weight", 0.5))
            loss = (1 - weight) * loss + weight * self._distillation_loss(images, logits)
        self._metrics(stage).update(logits.detach().softmax(dim=-1), targets)  # AUROC keeps its inputs: no graph
        self.log(
            f"{stage}/loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=True,
            batch_size=images.shape[0],
            sync_dist=stage != "train",
        )
        return loss

    def _distillation_loss(self, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """KL(teachers' mean softmax || student softmax) at temperature T, on the very views the student sees
        (consistent teaching, Beyer et al. 2022), scaled by T^2 so its gradients keep their size."""
        temperature = float(self.hparams.distill.get("temperature", 1.0))
        with torch.no_grad():
            teacher_probs = torch.stack(
                [(teacher(images).float() / temperature).softmax(-1) for teacher in self.teachers]
            ).mean(0)
        student = F.log_softmax(logits.float() / temperature, dim=-1)
        return F.kl_div(student, teacher_probs, reduction="batchmean") * temperature**2

    def on_fit_start(self) -> None:
        if self.hparams.distill and not self.teachers:  # lesionnet.training's callbacks run before this hook
            raise RuntimeError(
                "model.distill is set but no teacher was handed to the model: fit it with a Trainer from "
                "lesionnet.training.build_trainer, whose Teachers callback loads them."
            )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def _log_epoch_metrics(self, stage: str) -> None:
        metrics = self._metrics(stage)
        self.log_dict(metrics.compute(), prog_bar=False)
        metrics.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._log_epoch_metrics("val")
        self.val_metrics.reset()

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def configure_model(self) -> None:
        # In place (nn.Module.compile), on the Trainer's side only: parameter names, checkpoints and models
        # rebuilt from hparams (evaluate.py, the app) stay those of the plain eager model.
        if self.hparams.compile and not self._compiled:
            self.model.compile()
            self._compiled = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning does not save the global RNGs; without them a resumed run shuffles and drops out differently.
        # Plain tensors and tuples only, so the checkpoint still loads with weights_only=True.
        states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        checkpoint["rng_states"] = states
        if self.provenance is not None:  # last: bound to the state_dict as saved (callbacks such as EMA swap it)
            self.provenance.store(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resuming a fit: continue the RNG stream the interrupted run would have used. This runs before the first
        # training DataLoader iterator draws its seeds (the sanity check in between runs on an isolated RNG).
        states = checkpoint.get("rng_states")
        if states and self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            torch.set_rng_state(states["torch"])
            random.setstate(states["python"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state(states["cuda"])  # this process's device (set before restoring)

    def configure_optimizers(self) -> Any:
        optimizer = instantiate(self.hparams.optimizer)(self.model)
        if not self.hparams.scheduler:
            return optimizer
        scheduler = instantiate(self.hparams.scheduler)(optimizer)
        if isinstance(scheduler, tuple):  # timm's create_scheduler_v2 returns (scheduler, num_epochs)
            scheduler = scheduler[0]
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # timm schedulers are told which epoch starts next; torch ones just step.
        if isinstance(scheduler, TimmScheduler):
            scheduler.step(epoch=self.current_epoch + 1, metric=metric)
        elif metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)
