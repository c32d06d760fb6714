"""The training pipeline behind train.py: data -> model -> fit -> validate/test the best checkpoint.

Distillation teachers are trained checkpoints, so they are loaded here through the inference core and handed to the
LightningModule (:class:`Teachers`): the module itself never loads a checkpoint nor imports ``lesionnet.inference``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, WeightAveraging
from lightning.pytorch.plugins import TorchSyncBatchNorm
from omegaconf import DictConfig, OmegaConf
from timm.layers import BatchNormAct2d, SyncBatchNormAct, convert_sync_batchnorm

from lesionnet.contract.run import RunMetrics
from lesionnet.data.fingerprint import provenance_of
from lesionnet.data.run_folder import RunFolder
from lesionnet.inference import Member, forward, load_members

if TYPE_CHECKING:
    from lesionnet.module import LesionClassifier

log = logging.getLogger(__name__)


class TimmSyncBatchNorm(TorchSyncBatchNorm):
    """``trainer.sync_batchnorm`` for timm models.

    Lightning's own conversion turns timm's BatchNormAct2d (BatchNorm + activation, in EfficientNet and
    DenseNet) into a plain SyncBatchNorm and silently drops the activation; timm's converter keeps it.
    Frozen BatchNorm (FrozenBatchNorm2d / FrozenBatchNormAct2d from ``timm.utils.freeze``) is not a
    ``_BatchNorm`` and is left alone by both directions.
    """

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        return convert_sync_batchnorm(model)

    def revert(self, model: torch.nn.Module) -> torch.nn.Module:
        # Lightning reverts after fit; the base class would turn SyncBatchNormAct into a BatchNorm without its act.
        if not isinstance(model, SyncBatchNormAct):
            return super().revert(model)
        reverted = BatchNormAct2d(
            model.num_features,
            model.eps,
            model.momentum,  # type: ignore[arg-type]  # timm annotates float; None (cumulative average) passes through
            model.affine,
            model.track_running_stats,
            apply_act=False,
        )
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(reverted, name, getattr(model, name))  # the same tensors, as the base class does
        reverted.training = model.training
        for name, child in model.named_children():  # act and drop
            reverted.add_module(name, self.revert(child))
        return reverted


def resize_views(images: torch.Tensor, data_config: Mapping[str, Any]) -> torch.Tensor:
    """The student's batch at a teacher's input size (same views, same normalisation: checked when loading)."""
    size = tuple(data_config["input_size"][1:])
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def load_teachers(distill: Mapping[str, Any], student: LesionClassifier, datamodule: Any = None) -> list[Member]:
    """The teacher checkpoints (through the inference core), on the student's device, checked for leaks: a teacher
    that trained on the student's validation or test images would carry them into the student."""
    teachers = load_members(list(distill["teachers"]), device=str(student.device))
    data_config = student.hparams.data_config
    mean, std = data_config["mean"], data_config["std"]
    held_out = set()
    if datamodule is not None and getattr(datamodule, "table", None) is not None:
        table = datamodule.table
        held_out = set(table.loc[table["split"].isin(["val", "test"]), "image_id"])
    for teacher in teachers:
        if list(teacher.data_config["mean"]) != list(mean) or list(teacher.data_config["std"]) != list(std):
            raise ValueError(
                f"Teacher {teacher.path} normalises with mean/std {teacher.data_config['mean']}/"
                f"{teacher.data_config['std']}, the student with {mean}/{std}: distil between models that share "
                "them (e.g. the EfficientNet-Lite family)."
            )
        if teacher.provenance is None:
            raise ValueError(f"Teacher {teacher.path} has no provenance record: cannot check what it trained on.")
        trained = {
            i
            for i, split in zip(teacher.provenance.image_id, teacher.provenance.split, strict=True)
            if split == "train"
        }
        if trained & held_out:
            raise ValueError(
                f"Teacher {teacher.path} trained on {len(trained & held_out)} of the student's validation/test "
                "images: train teachers on the same split (data.split_seed / data.split_file) as the student."
            )
        teacher.model.requires_grad_(False).eval()
    return teachers


def teacher_logits(teacher: Member) -> Callable[[torch.Tensor], torch.Tensor]:
    """The teacher as the student uses it: the student's batch (resized to the teacher's input) -> the teacher's
    logits, by the inference core's forward pass."""

    def logits(images: torch.Tensor) -> torch.Tensor:
        return forward(teacher, resize_views(images, teacher.data_config)).logits

    return logits


class Teachers(Callback):
    """Hands ``model.distill``'s teachers to the student when the fit starts, on the student's device (each DDP rank
    its own), checked against the datamodule's held-out images (:func:`load_teachers`)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        student = cast("LesionClassifier", pl_module)  # build_trainer adds this callback for model.distill only
        distill = student.hparams.get("distill")
        if distill and not student.teachers:
            members = load_teachers(distill, student, getattr(trainer, "datamodule", None))
            student.teachers = [teacher_logits(member) for member in members]
            if student.provenance is not None:  # the student learns what its teachers learnt: evaluate must know
                student.provenance = student.provenance.with_teachers(
                    [(member.sha256, member.provenance) for member in members if member.provenance is not None]
                )
                log.info(
                    "Provenance with %d teacher(s): %d training/validation images",
                    len(members),
                    len(student.provenance.image_id),
                )


def resolve_ckpt_path(ckpt_path: str | None, cfg: DictConfig) -> str | None:
    """``ckpt_path=last`` = this run folder's ``last.ckpt`` (resume a crashed run with ``hydra.run.dir=<run>``).

    Lightning's own ``"last"`` silently starts from scratch when there is none; a resume that does not resume
    is an error here.
    """
    if ckpt_path != "last":
        return ckpt_path
    folder = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath") or Path(cfg.paths.output_dir, "checkpoints")
    last = Path(folder, "last.ckpt")
    if not last.is_file():
        raise FileNotFoundError(
            f"ckpt_path=last: there is no {last}. Resume in the folder of the run that wrote it, "
            "hydra.run.dir=<that run>, or give a checkpoint file: ckpt_path=<path>."
        )
    return str(last)


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a config group such as callbacks or logger."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """The Lightning Trainer of ``cfg.trainer`` with the callbacks and loggers groups (and :class:`Teachers` when the
    model distils)."""
    plugins = list(instantiate(cfg.trainer.get("plugins")) or [])
    if cfg.trainer.get("sync_batchnorm"):
        plugins.append(TimmSyncBatchNorm())  # replaces Lightning's converter, which breaks timm's BatchNormAct2d
    callbacks = instantiate_group(cfg.get("callbacks"))
    if OmegaConf.select(cfg, "model.distill"):
        callbacks.append(Teachers())
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=instantiate_group(cfg.get("logger")) or False,
        plugins=plugins or None,
    )


def build_model(cfg: DictConfig, datamodule: Any) -> Any:
    """The LightningModule of ``cfg.model`` fitted to the data: classes, loss weights or prior, preprocessing."""
    if cfg.model.get("logit_adjust_tau") and datamodule.imbalance != "none":
        raise ValueError(
            f"model.logit_adjust_tau={cfg.model.logit_adjust_tau} balances the classes itself; with "
            f"data.imbalance={datamodule.imbalance} they would be balanced twice. Set data.imbalance=none."
        )
    return instantiate(
        cfg.model,
        _recursive_=False,
        class_names=list(datamodule.class_names),
        class_weights=datamodule.loss_weights,
        data_config=datamodule.data_config,
        class_prior=datamodule.class_prior,
    )


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items())}


def train(cfg: DictConfig) -> float | None:
    """Fit, then score the best checkpoint on val and test; writes split.csv and metrics.json.

    Returns the monitored validation metric of the best checkpoint (what Hydra sweepers optimise).
    """
    start = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg)

    trainer = build_trainer(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    if trainer.is_global_zero:  # under DDP every rank runs this function; one writes
        split_path = datamodule.save_split(output_dir / "split.csv")
        log.info("Split written to %s\n%s", split_path, datamodule.split_summary())

    model = build_model(cfg, datamodule)
    provenance_start = time.perf_counter()
    model.provenance = provenance_of(datamodule.table)
    log.info(
        "Provenance of %d training/validation images fingerprinted in %.1f s",
        len(model.provenance.image_id),
        time.perf_counter() - provenance_start,
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - start

    checkpoint = cast("ModelCheckpoint | None", trainer.checkpoint_callback)  # the configs' checkpoints are these
    best = checkpoint.best_model_path if checkpoint else ""
    if not best:
        log.warning("No best checkpoint (checkpointing off or fast_dev_run): scoring the final weights.")
    ckpt = best or None
    # Weight-averaging (EMA) callbacks load the non-averaged weights back when a checkpoint is restored in
    # this Trainer; the checkpoint's own state_dict (what validation selected) is what must be scored.
    callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's CallbackConnector
    callbacks[:] = [c for c in callbacks if not isinstance(c, WeightAveraging)]
    val = _scalars(trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)[0])
    test = {}
    if cfg.get("test"):
        test = _scalars(trainer.test(model, datamodule=datamodule, ckpt_path=ckpt)[0])

    summary = RunMetrics(
        backbone=cfg.model.backbone,
        monitor=cfg.monitor,
        model=model.describe(),
        best_checkpoint=best,
        epochs_trained=trainer.current_epoch,
        fit_seconds=round(fit_seconds, 1),
        wall_seconds=round(time.perf_counter() - start, 1),
        data_root=str(datamodule.root),
        data_config=model.hparams.data_config,
        split_images={k: int(v) for k, v in datamodule.table["split"].value_counts().items()},
        fold=cfg.data.get("fold"),
        val=val,
        test=test,
        config=cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True)),  # a DictConfig gives a dict
    )
    if trainer.is_global_zero:
        log.info("Metrics written to %s", RunFolder(output_dir).write_metrics(summary))
    return val.get(cfg.monitor)
