"""The training pipeline behind train.py: data -> model -> fit -> validate/test the best checkpoint."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a config group such as callbacks or logger."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items())}


def train(cfg: DictConfig) -> float | None:
    """Fit, then score the best checkpoint on val and test; writes split.csv and metrics.json.

    Returns the monitored validation metric of the best checkpoint (what Hydra sweepers optimise).
    """
    start = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    split_path = datamodule.save_split(output_dir / "split.csv")
    log.info("Split written to %s\n%s", split_path, datamodule.split_summary())

    model = instantiate(
        cfg.model, _recursive_=False, class_names=list(datamodule.class_names),
        class_weights=datamodule.loss_weights, data_config=datamodule.data_config,
    )
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")),
        logger=instantiate_group(cfg.get("logger")) or False,
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_seconds = time.perf_counter() - start

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not best:
        log.warning("No best checkpoint (checkpointing off or fast_dev_run): scoring the final weights.")
    ckpt = best or None
    val = _scalars(trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)[0])
    test = {}
    if cfg.get("test"):
        test = _scalars(trainer.test(model, datamodule=datamodule, ckpt_path=ckpt)[0])

    summary = {
        "backbone": cfg.model.backbone,
        "monitor": cfg.monitor,
        "model": model.describe(),
        "best_checkpoint": best,
        "epochs_trained": trainer.current_epoch,
        "fit_seconds": round(fit_seconds, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "data_root": str(datamodule.root),
        "data_config": model.hparams.data_config,
        "split_images": {k: int(v) for k, v in datamodule.table["split"].value_counts().items()},
        "val": val,
        "test": test,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    log.info("Metrics written to %s", output_dir / "metrics.json")
    return val.get(cfg.monitor)
