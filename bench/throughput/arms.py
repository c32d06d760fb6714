"""The two CPU arms, each run in its own worker process: ``LesionClassifier`` under the config's Lightning Trainer
and the same network in a plain loop; and one round of a config (both arms, alternating order, their ratios)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from .config import compose_config, set_threads, train_trainer_options
from .plain_loop import build_plain_parts, plain_eval, plain_train_step, step_scheduler
from .probes import Clock, clock_callback, load_average, max_rss_mb
from .workers import run_worker

DEFAULT_CONFIGS = ("baseline_cpu", "cpu_lite0_all")
# (warm-up steps, timed steps): ~20-40 s per arm on 2 cores, and within one epoch of the full HAM10000 train split
# (6,982 images / 32 = 218 steps), so no epoch-end work falls into the timing.
DEFAULT_STEPS = {"baseline_cpu": (10, 150), "cpu_lite0_all": (5, 50)}
FALLBACK_STEPS = (5, 50)


def _setup(spec: dict[str, Any], output_dir: Path) -> tuple[Any, Any]:
    import lightning as L
    from hydra.utils import instantiate

    set_threads(spec.get("threads"))
    cfg = compose_config(
        spec["config"],
        output_dir,
        spec.get("root"),
        spec.get("overrides", ()),
        spec.get("pretrained", False),
        spec.get("loggers", True),
    )
    L.seed_everything(cfg.seed, workers=True)  # as lesionnet.training.train
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    return cfg, datamodule


def _eval_images(datamodule: Any, batches: int | None) -> int:
    n = len(datamodule.datasets["val"])
    return n if batches is None else min(n, batches * datamodule.eval_batch_size)


def lightning_arm(spec: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    import copy

    import torch
    from omegaconf import open_dict

    from lesionnet.training import build_model, build_trainer

    load_before = load_average()
    cfg, dm = _setup(spec, output_dir)
    model = build_model(cfg, dm)
    clock = Clock(spec["warmup"], spec["steps"])
    fit_cfg = copy.deepcopy(cfg)
    train_trainer_options(fit_cfg, clock.total)
    trainer = build_trainer(fit_cfg)
    trainer.callbacks.append(clock_callback(clock))
    trainer.fit(model, datamodule=dm)
    train = clock.result()
    rss_train = max_rss_mb()
    threads_after_fit = torch.get_num_threads()

    def validate(batches: int | None) -> float:
        eval_cfg = copy.deepcopy(cfg)
        with open_dict(eval_cfg):
            eval_cfg.trainer.limit_val_batches = batches if batches is not None else 1.0
        eval_trainer = build_trainer(eval_cfg)
        start = time.perf_counter()
        eval_trainer.validate(model, datamodule=dm, verbose=False)
        return time.perf_counter() - start

    if spec["eval_warmup"]:
        validate(spec["eval_warmup"])
    seconds = validate(spec["eval_batches"])
    images = _eval_images(dm, spec["eval_batches"])
    return _arm_result(
        "lightning",
        spec,
        cfg,
        dm,
        train,
        images,
        seconds,
        rss_train,
        threads_after_fit,
        load_before,
        callbacks=[type(c).__name__ for c in trainer.callbacks],
        loggers=[type(lg).__name__ for lg in trainer.loggers],
    )


def plain_arm(spec: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    import torch

    load_before = load_average()
    cfg, dm = _setup(spec, output_dir)
    parts = build_plain_parts(cfg, dm)
    loader = dm.train_dataloader()
    clock = Clock(spec["warmup"], spec["steps"])
    parts["net"].train()
    epoch = 0
    while not clock.done:
        for images, targets in loader:
            plain_train_step(parts, images, targets)
            clock.step_end(int(images.shape[0]))
            if clock.done:
                break
        else:
            epoch += 1
            step_scheduler(parts["scheduler"], epoch)
    train = clock.result()
    rss_train = max_rss_mb()
    threads_after_fit = torch.get_num_threads()
    if spec["eval_warmup"]:
        plain_eval(parts, dm, spec["eval_warmup"])
    start = time.perf_counter()
    images, _ = plain_eval(parts, dm, spec["eval_batches"])
    seconds = time.perf_counter() - start
    return _arm_result("plain", spec, cfg, dm, train, images, seconds, rss_train, threads_after_fit, load_before)


def _arm_result(
    arm: str,
    spec: dict[str, Any],
    cfg: Any,
    dm: Any,
    train: dict[str, Any],
    eval_images: int,
    eval_seconds: float,
    rss_train: float,
    threads: int,
    load_before: list[float],
    **extra: Any,
) -> dict[str, Any]:
    import torch

    return {
        "arm": arm,
        "config": spec["config"],
        "pid": os.getpid(),
        "train": train,
        "eval": {
            "images": eval_images,
            "seconds": round(eval_seconds, 4),
            "images_per_s": round(eval_images / eval_seconds, 2),
            "warmup_batches": spec["eval_warmup"],
        },
        "max_rss_mb_after_train": round(rss_train, 1),
        "max_rss_mb": round(max_rss_mb(), 1),
        "torch_threads": threads,
        "torch_threads_at_end": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": load_average(),
        "backbone": cfg.model.backbone,
        "image_size": list(dm.data_config["input_size"][1:]),
        "batch_size": dm.batch_size,
        "eval_batch_size": dm.eval_batch_size,
        "num_workers": dm.num_workers,
        "train_images_in_split": len(dm.datasets["train"]),
        "val_images": len(dm.datasets["val"]),
        "channels_last": bool(cfg.model.channels_last),
        "precision": str(cfg.trainer.precision),
        **extra,
    }


def run_round(args: argparse.Namespace, name: str, r: int, workdir: Path) -> dict[str, Any]:
    """One round of one CPU config: both arms in fresh processes, in alternating order, and their ratios."""
    warmup, steps = DEFAULT_STEPS.get(name, FALLBACK_STEPS)
    spec = {
        "config": name,
        "round": r,
        "root": args.root,
        "overrides": args.override,
        "warmup": args.warmup or warmup,
        "steps": args.steps or steps,
        "eval_warmup": args.eval_warmup,
        "eval_batches": args.eval_batches,
        "threads": args.threads,
        "loggers": not args.no_loggers,
        "pretrained": args.pretrained,
    }
    order = ("lightning", "plain") if r % 2 else ("plain", "lightning")  # A B, then B A: no order bias
    row: dict[str, Any] = {"round": r, "order": list(order)}
    for arm in order:
        row[arm] = run_worker(arm, spec, workdir, args.timeout)
        print(
            f"round {r} {name} {arm}: train {row[arm]['train']['images_per_s']:.1f} img/s, eval "
            f"{row[arm]['eval']['images_per_s']:.1f} img/s, peak RSS {row[arm]['max_rss_mb']:.0f} MB, "
            f"load {row[arm]['load_before'][0]}",
            file=sys.stderr,
            flush=True,
        )
    row["train_ratio"] = round(row["lightning"]["train"]["images_per_s"] / row["plain"]["train"]["images_per_s"], 4)
    row["eval_ratio"] = round(row["lightning"]["eval"]["images_per_s"] / row["plain"]["eval"]["images_per_s"], 4)
    # CPU seconds per image (process + loader workers), plain/Lightning: < 1 = Lightning uses more CPU
    row["train_cpu_ratio"] = round(
        row["plain"]["train"]["cpu_ms_per_image"] / row["lightning"]["train"]["cpu_ms_per_image"], 4
    )
    return row
