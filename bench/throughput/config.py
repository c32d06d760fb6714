"""The training config the benchmarks measure: ``lesionnet/conf/train.yaml`` + an experiment, composed with Hydra as
``train.py experiment=<name>`` does, with the bench's callbacks and trainer limits; and the options both scripts
share."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "lesionnet" / "conf"
KEEP_CALLBACKS = ("progress_bar", "model_summary", "lr_monitor")


def compose_config(
    experiment: str | None,
    output_dir: str | Path,
    root: str | None = None,
    overrides: Sequence[str] = (),
    pretrained: bool = False,
    loggers: bool = True,
) -> Any:
    """``lesionnet/conf/train.yaml`` + ``experiment`` + overrides, resolved, with the bench's callbacks/loggers."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    args = [f"experiment={experiment}"] if experiment else []
    args.append(f"paths.output_dir={output_dir}")
    if root:
        args.append(f"data.root={root}")
    if not pretrained:
        args.append("model.pretrained=false")
    args += list(overrides)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=args)
    OmegaConf.resolve(cfg)  # before the trainer changes below (the scheduler reads trainer.max_epochs)
    with open_dict(cfg):
        callbacks = cfg.get("callbacks") or {}
        keep = [k for k in KEEP_CALLBACKS if k in callbacks and (loggers or k != "lr_monitor")]
        cfg.callbacks = {k: callbacks[k] for k in keep}
        if not loggers:
            cfg.logger = None
    return cfg


def train_trainer_options(cfg: Any, max_steps: int) -> None:
    """Fit exactly ``max_steps`` steps without validation or checkpoints (validation is timed apart)."""
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.trainer.max_steps = max_steps
        cfg.trainer.max_epochs = -1
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.num_sanity_val_steps = 0
        cfg.trainer.enable_checkpointing = False


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The options both benchmark scripts share."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="data.root (default: the embedded HAM10000 sample)")
    return p
