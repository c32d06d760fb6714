"""Train and eval throughput: LesionNet's LightningModule under a Lightning Trainer vs a plain PyTorch loop.

What is compared (per CPU config, composed with Hydra from ``lesionnet/conf/`` as ``train.py experiment=<name>``):

* **lightning**: ``LesionClassifier`` fitted by the Trainer of ``lesionnet.training.build_trainer`` (the config's
  ``trainer=cpu``: precision, ``log_every_n_steps``, ...), with the DataModule's ``train_dataloader``. Kept from the
  config: the progress bar (TQDMProgressBar, refresh 10), the model summary, the LR monitor and the loggers (CSV +
  TensorBoard, into a temporary folder), so ``self.log`` and the per-step torchmetrics of ``training_step`` run as
  in a real run. Left out: model checkpointing (``enable_checkpointing=false``), early stopping (both act only at
  epoch/validation end) and the EMA callback of ``cpu_lite0_all`` (an algorithm, not framework cost: the plain loop
  has none; it would not update in epoch 0 anyway). Validation is off during the train timing and timed apart.
* **plain**: the very same ``nn.Module`` (``LesionClassifier(...).model``: same timm model, freezing,
  channels_last), the same DataModule loader (same batch size, num_workers, augmentations), the optimizer and
  scheduler built from the same config (``timm.optim.create_optimizer_v2`` via ``cfg.model.optimizer``), the same
  loss (class weights from ``data.imbalance``, label smoothing), ``zero_grad / backward / step / loss.item()``.

Both arms seed with ``seed_everything(cfg.seed)``, use the same torch thread count and run in a fresh subprocess
each (peak RSS = that process's ``ru_maxrss``; no shared allocator or page state), alternating which arm goes first
(A B, B A, ...) for ``--rounds`` rounds. Each arm: ``warmup`` steps not counted, then ``steps`` timed steps
(``time.perf_counter`` from the end of the last warm-up step to the end of the last timed step; data loading, the
optimizer step and all per-step hooks are inside). Eval: ``trainer.validate`` (the module's validation_step: loss,
softmax, torchmetrics) vs a ``torch.no_grad()`` loop (eval mode, loss, softmax, accumulate, accuracy at the end)
over the same val loader, after ``--eval-warmup`` batches of warm-up; both timings include creating the loader
and starting its workers. The ratio lightning/plain (img/s) per round and its median are reported; the target is
>= 0.95.

GPU matrix (when CUDA is available, or on the CPU with ``--gpu-matrix-on-cpu``): DenseNet201 (224 px) and
InceptionV3 (299 px), fp32 vs bf16-mixed vs bf16-mixed + channels_last vs + ``torch.compile``, Lightning train
img/s on a synthetic batch already on the device (isolates the model from the data pipeline) and peak GPU memory.

    python bench/train_throughput.py --root ../shared/data/ham10000_200x150 --json train_throughput.json
    python bench/train_throughput.py --configs baseline_cpu --rounds 1 --steps 20 --warmup 3
    python bench/train_throughput.py --skip-cpu --gpu-matrix-on-cpu --gpu-steps 2 --gpu-batch 2   # code path check
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "lesionnet" / "conf"
TARGET_RATIO = 0.95
DEFAULT_CONFIGS = ("baseline_cpu", "cpu_lite0_all")
# (warm-up steps, timed steps): ~20-40 s per arm on 2 cores, and within one epoch of the full HAM10000 train split
# (6,982 images / 32 = 218 steps), so no epoch-end work falls into the timing.
DEFAULT_STEPS = {"baseline_cpu": (10, 150), "cpu_lite0_all": (5, 50)}
FALLBACK_STEPS = (5, 50)
KEEP_CALLBACKS = ("progress_bar", "model_summary", "lr_monitor")
GPU_MODELS = ("densenet201:224", "inception_v3:299")
# name: (precision, channels_last, compile)
GPU_VARIANTS: dict[str, tuple[str, bool, bool]] = {
    "fp32": ("32-true", False, False),
    "bf16": ("bf16-mixed", False, False),
    "bf16_cl": ("bf16-mixed", True, False),
    "bf16_cl_compile": ("bf16-mixed", True, True),
}


# ----------------------------------------------------------------------------------------------------- helpers
def max_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident memory of this process now (not the peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def children_cpu_seconds() -> float:
    """user+system CPU seconds of this process's live child processes (the DataLoader workers)."""
    me, total = str(os.getpid()), 0
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # after "pid (comm)": state, ppid, ..., utime (14th), stime (15th)
            total += int(fields[11]) + int(fields[12])
    return total / tick


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_info() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "logical_cpus": os.cpu_count(), "usable_cpus": cores}


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("torch", "lightning", "timm", "torchmetrics", "albumentations", "opencv-python-headless", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty_files": len(git("status", "--porcelain").splitlines())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty_files": None}


def run_metadata() -> dict[str, Any]:
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "git": git_state(),
        "versions": versions(),
        "cpu": cpu_info(),
        "hostname": platform.node(),
    }


class Clock:
    """Counts training steps; times ``steps`` of them after ``warmup`` uncounted ones (end of step to end of step)."""

    def __init__(self, warmup: int, steps: int, sync: Callable[[], None] | None = None) -> None:
        if warmup < 1 or steps < 1:
            raise ValueError(f"warmup and steps must be >= 1, got {warmup} and {steps}.")
        self.warmup, self.steps, self.sync = warmup, steps, sync
        self.n = self.images = 0
        self.t0 = self.t1 = 0.0
        self.cpu0 = self.cpu1 = (0.0, 0.0)
        self.rss0 = self.rss1 = self.rss_max = 0.0

    @property
    def total(self) -> int:
        return self.warmup + self.steps

    @property
    def done(self) -> bool:
        return self.n >= self.total

    def step_end(self, batch_size: int) -> None:
        self.n += 1
        if self.warmup < self.n <= self.total:
            self.images += batch_size
        if self.n in (self.warmup, self.total):
            if self.sync is not None:
                self.sync()
            now = time.perf_counter()
            cpu = (time.process_time(), children_cpu_seconds())
            if self.n == self.warmup:
                self.t0, self.cpu0 = now, cpu
            else:
                self.t1, self.cpu1 = now, cpu
        if self.warmup <= self.n <= self.total:  # current RSS at each timed step end (a growth = memory kept)
            rss = current_rss_mb()
            self.rss_max = max(self.rss_max, rss)
            if self.n == self.warmup:
                self.rss0 = rss
            self.rss1 = rss

    def result(self) -> dict[str, Any]:
        if self.n < self.total:
            raise RuntimeError(f"Only {self.n} of {self.total} steps ran.")
        seconds = self.t1 - self.t0
        main_cpu, workers_cpu = self.cpu1[0] - self.cpu0[0], self.cpu1[1] - self.cpu0[1]
        return {
            "warmup_steps": self.warmup,
            "steps": self.steps,
            "images": self.images,
            "seconds": round(seconds, 4),
            "images_per_s": round(self.images / seconds, 2),
            "cpu_seconds_main": round(main_cpu, 3),
            "cpu_seconds_workers": round(workers_cpu, 3),
            "cpu_ms_per_image": round(1000 * (main_cpu + workers_cpu) / self.images, 3),
            "rss_mb_timed_start": round(self.rss0, 1),
            "rss_mb_timed_end": round(self.rss1, 1),
            "rss_mb_timed_max": round(self.rss_max, 1),
            "rss_growth_mb_per_step": round((self.rss1 - self.rss0) / self.steps, 3),
        }


def clock_callback(clock: Clock) -> Any:
    """A Lightning callback driving ``clock`` from ``on_train_batch_end`` (after the optimizer step)."""
    import lightning as L

    class StepClock(L.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            clock.step_end(int(batch[0].shape[0]))

    return StepClock()


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


def build_plain_parts(cfg: Any, datamodule: Any) -> dict[str, Any]:
    """The plain loop's model, optimizer, scheduler and loss settings, built exactly as the LightningModule does."""
    from hydra.utils import instantiate

    from lesionnet.training import build_model

    module = build_model(cfg, datamodule)
    parts = {
        "net": module.model,  # the timm nn.Module with the module's freezing and memory format
        "weight": module.class_weights,
        "label_smoothing": float(module.hparams.label_smoothing),
        "channels_last": bool(module.hparams.channels_last),
    }
    del module  # its torchmetrics are Lightning-side work
    if cfg.model.get("compile"):
        parts["net"].compile()  # in place, as LesionClassifier.configure_model does on the Trainer's side
    optimizer = instantiate(cfg.model.optimizer)(parts["net"])  # as LesionClassifier.configure_optimizers
    scheduler = instantiate(cfg.model.scheduler)(optimizer) if cfg.model.get("scheduler") else None
    if isinstance(scheduler, tuple):
        scheduler = scheduler[0]
    parts.update(optimizer=optimizer, scheduler=scheduler)
    return parts


def plain_train_step(parts: dict[str, Any], images: Any, targets: Any) -> float:
    import torch
    import torch.nn.functional as F

    if parts["channels_last"]:
        images = images.contiguous(memory_format=torch.channels_last)
    loss = F.cross_entropy(
        parts["net"](images), targets, weight=parts["weight"], label_smoothing=parts["label_smoothing"]
    )
    parts["optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    parts["optimizer"].step()
    return loss.item()


def step_scheduler(scheduler: Any, epoch: int) -> None:
    from timm.scheduler.scheduler import Scheduler as TimmScheduler

    if isinstance(scheduler, TimmScheduler):
        scheduler.step(epoch=epoch)
    elif scheduler is not None:
        scheduler.step()


def model_only_throughput(cfg: Any, datamodule: Any, warmup: int, steps: int) -> dict[str, Any]:
    """The plain train step on one real batch repeated: the model's speed with the data pipeline taken out."""
    import torch

    parts = build_plain_parts(cfg, datamodule)
    workers = datamodule.num_workers
    datamodule.num_workers = 0
    try:
        images, targets = next(iter(datamodule.train_dataloader()))
    finally:
        datamodule.num_workers = workers
    parts["net"].train()
    clock = Clock(warmup, steps)
    while not clock.done:
        plain_train_step(parts, images, targets)
        clock.step_end(int(images.shape[0]))
    return {**clock.result(), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------- the two CPU arms
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


def plain_eval(parts: dict[str, Any], datamodule: Any, batches: int | None) -> tuple[int, float]:
    import torch
    import torch.nn.functional as F

    net = parts["net"]
    net.eval()
    probs, targets, loss_sum = [], [], 0.0
    with torch.no_grad():
        for i, (images, labels) in enumerate(datamodule.val_dataloader()):
            if batches is not None and i >= batches:
                break
            if parts["channels_last"]:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = net(images)
            loss = F.cross_entropy(logits, labels, weight=parts["weight"], label_smoothing=parts["label_smoothing"])
            loss_sum += loss.item() * len(labels)
            probs.append(logits.softmax(dim=-1))
            targets.append(labels)
    probs_t, targets_t = torch.cat(probs), torch.cat(targets)
    accuracy = (probs_t.argmax(dim=1) == targets_t).float().mean().item()
    return len(targets_t), accuracy


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


# --------------------------------------------------------------------------------------------------- GPU matrix
class RepeatBatch:
    """One batch, ``n`` times: a synthetic train loader already on the device (not a list: Lightning would read a
    list as several loaders)."""

    def __init__(self, batch: Any, n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self) -> Any:
        return (self.batch for _ in range(self.n))

    def __len__(self) -> int:
        return self.n


def gpu_cell(spec: dict[str, Any], model_group: str, size: int, variant: str, output_dir: Path) -> dict[str, Any]:
    import torch
    from hydra.utils import instantiate

    from lesionnet.classes import CLASS_NAMES
    from lesionnet.data.transforms import resolve_data_config
    from lesionnet.training import build_trainer

    on_cpu = spec["on_cpu"]
    precision, channels_last, compiled = GPU_VARIANTS[variant]
    batch = spec["batch"]
    cfg = compose_config(
        None,
        output_dir,
        None,
        [
            f"model={model_group}",
            f"trainer={'cpu' if on_cpu else 'gpu'}",
            f"trainer.precision={precision}",
            f"model.channels_last={str(channels_last).lower()}",
            f"model.compile={str(compiled).lower()}",
            f"data.batch_size={batch}",
            *spec.get("overrides", ()),
        ],
        pretrained=False,
        loggers=spec.get("loggers", True),
    )
    device = torch.device("cpu" if on_cpu else "cuda")
    data_config = resolve_data_config(cfg.model.backbone, image_size=size)
    model = instantiate(
        cfg.model, _recursive_=False, class_names=list(CLASS_NAMES), class_weights=None, data_config=data_config
    )
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    targets = torch.randint(len(CLASS_NAMES), (batch,), generator=generator).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    clock = Clock(spec["warmup"], spec["steps"], sync=sync)
    train_trainer_options(cfg, clock.total)
    trainer = build_trainer(cfg)
    trainer.callbacks.append(clock_callback(clock))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, train_dataloaders=RepeatBatch((images, targets), clock.total))
    result = {
        "model": model_group,
        "backbone": cfg.model.backbone,
        "image_size": size,
        "batch_size": batch,
        "variant": variant,
        "precision": precision,
        "channels_last": channels_last,
        "compile": compiled,
        "device": str(device),
        **clock.result(),
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
        "peak_gpu_memory_reserved_mb": (
            round(torch.cuda.max_memory_reserved() / 2**20, 1) if device.type == "cuda" else None
        ),
    }
    del trainer, model, images, targets
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def gpu_matrix(spec: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    import torch

    set_threads(spec.get("threads"))
    on_cpu = spec["on_cpu"]
    info: dict[str, Any] = {
        "on_cpu": on_cpu,
        "cuda_available": torch.cuda.is_available(),
        "load_before": load_average(),
        "synthetic_data": True,
    }
    if not on_cpu and not torch.cuda.is_available():
        return {**info, "skipped": "CUDA is not available"}
    if on_cpu:
        info["device_name"] = f"CPU: {cpu_info()['model']} (--gpu-matrix-on-cpu)"
    else:
        info.update(
            device_name=torch.cuda.get_device_name(0),
            cuda=torch.version.cuda,
            capability=list(torch.cuda.get_device_capability(0)),
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    cells = []
    for item in spec["models"]:
        group, size = item.split(":")
        for variant in spec["variants"]:
            base = {"model": group, "image_size": int(size), "variant": variant, "batch_size": spec["batch"]}
            if GPU_VARIANTS[variant][2] and on_cpu and not spec.get("compile_on_cpu"):
                cells.append({**base, "skipped": "torch.compile not run on the CPU (--gpu-compile-on-cpu)"})
                continue
            try:
                cells.append(gpu_cell(spec, group, int(size), variant, output_dir / f"{group}_{variant}"))
            except Exception as err:  # one failing cell (OOM, compiler) must not lose the others
                cells.append({**base, "error": f"{type(err).__name__}: {err}"[:2000]})
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return {**info, "cells": cells, "max_rss_mb": round(max_rss_mb(), 1), "load_after": load_average()}


# --------------------------------------------------------------------------------------------------- the driver
WORKERS: dict[str, Callable[[dict[str, Any], Path], dict[str, Any]]] = {
    "lightning": lightning_arm,
    "plain": plain_arm,
    "gpu": gpu_matrix,
}


def run_worker(kind: str, spec: dict[str, Any], workdir: Path, timeout: float) -> dict[str, Any]:
    """One arm in a fresh interpreter; its stdout/stderr (progress bar included) go to a log file."""
    tag = f"{kind}_{spec.get('config', 'matrix')}_{spec.get('round', 0)}"
    spec_file, out_file, log_file = (workdir / f"{tag}.{ext}" for ext in ("spec.json", "out.json", "log"))
    spec_file.write_text(json.dumps(spec))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_worker",
        kind,
        "--_spec",
        str(spec_file),
        "--_out",
        str(out_file),
    ]
    with log_file.open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=timeout)
    if proc.returncode != 0 or not out_file.is_file():
        tail = log_file.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{tag} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out_file.read_text())


def median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def col(arm: str, part: str) -> list[float]:
        return [r[arm][part]["images_per_s"] for r in rounds]

    train_ratios = [r["train_ratio"] for r in rounds]
    eval_ratios = [r["eval_ratio"] for r in rounds]
    cpu_ratios = [r["train_cpu_ratio"] for r in rounds]
    return {
        "train_ratios": train_ratios,
        "median_train_ratio": median(train_ratios),
        "train_cpu_ratios": cpu_ratios,
        "median_train_cpu_ratio": median(cpu_ratios),
        "eval_ratios": eval_ratios,
        "median_eval_ratio": median(eval_ratios),
        "median_train_images_per_s": {arm: median(col(arm, "train")) for arm in ("lightning", "plain")},
        "median_eval_images_per_s": {arm: median(col(arm, "eval")) for arm in ("lightning", "plain")},
        "median_train_cpu_ms_per_image": {
            arm: median([r[arm]["train"]["cpu_ms_per_image"] for r in rounds]) for arm in ("lightning", "plain")
        },
        "max_rss_mb": {arm: max(r[arm]["max_rss_mb"] for r in rounds) for arm in ("lightning", "plain")},
        "max_rss_mb_after_train": {
            arm: max(r[arm]["max_rss_mb_after_train"] for r in rounds) for arm in ("lightning", "plain")
        },
        "train_meets_target": (median(train_ratios) or 0) >= TARGET_RATIO,
        "eval_meets_target": (median(eval_ratios) or 0) >= TARGET_RATIO,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Train throughput: Lightning vs plain PyTorch ({report['date_utc']})",
        "",
        f"CPU: {report['cpu']['model']} ({report['cpu']['usable_cpus']} usable CPUs), "
        f"torch {report['versions'].get('torch')}, lightning {report['versions'].get('lightning')}, "
        f"timm {report['versions'].get('timm')}; load average before {report['load_before']}, "
        f"after {report['load_after']}; commit {str(report['git']['commit'])[:10]}",
        "",
    ]
    for name, res in report["configs"].items():
        first = res["rounds"][0]["lightning"]
        lines += [
            f"## {name}: {first['backbone']}, {first['image_size'][0]}x{first['image_size'][1]}, batch "
            f"{first['batch_size']}, {first['num_workers']} workers, {first['torch_threads']} torch threads, "
            f"{first['train']['warmup_steps']} warm-up + {first['train']['steps']} timed steps",
            "",
            "L = Lightning, P = plain. CPU ms/img: user+system CPU of the process and its loader workers per "
            "trained image.",
            "",
            "| round | order | train img/s L | train img/s P | **ratio** | eval img/s L | eval img/s P | **ratio** "
            "| train CPU ms/img L / P | peak RSS MB L / P | RSS growth MB/step L / P | load at start L, P |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in res["rounds"]:
            li, pl = r["lightning"], r["plain"]
            lines.append(
                f"| {r['round']} | {' '.join(a[0].upper() for a in r['order'])} | {li['train']['images_per_s']:.1f} "
                f"| {pl['train']['images_per_s']:.1f} | **{r['train_ratio']:.3f}** | {li['eval']['images_per_s']:.1f} "
                f"| {pl['eval']['images_per_s']:.1f} | **{r['eval_ratio']:.3f}** "
                f"| {li['train']['cpu_ms_per_image']:.2f} / {pl['train']['cpu_ms_per_image']:.2f} "
                f"| {li['max_rss_mb']:.0f} / {pl['max_rss_mb']:.0f} "
                f"| {li['train']['rss_growth_mb_per_step']:.2f} / {pl['train']['rss_growth_mb_per_step']:.2f} "
                f"| {li['load_before'][0]}, {pl['load_before'][0]} |"
            )
        s = res["summary"]
        lines += [
            "",
            f"Median ratio Lightning/plain: train **{s['median_train_ratio']:.3f}**, eval "
            f"**{s['median_eval_ratio']:.3f}**, train CPU time per image plain/Lightning "
            f"{s['median_train_cpu_ratio']:.3f} (target >= {TARGET_RATIO}: train "
            f"{'met' if s['train_meets_target'] else 'NOT met'}, eval "
            f"{'met' if s['eval_meets_target'] else 'NOT met'})",
            "",
        ]
    gpu = report.get("gpu")
    if gpu:
        lines += ["## GPU matrix (Lightning, synthetic batch on the device)", ""]
        if gpu.get("skipped"):
            lines += [f"Skipped: {gpu['skipped']}.", ""]
        else:
            lines += [
                f"Device: {gpu['device_name']}",
                "",
                "| model | size | batch | variant | img/s | peak GPU MB | note |",
                "|---|---:|---:|---|---:|---:|---|",
            ]
            for c in gpu["cells"]:
                note = c.get("skipped") or c.get("error") or ""
                ips = f"{c['images_per_s']:.1f}" if "images_per_s" in c else "-"
                mem = c.get("peak_gpu_memory_mb")
                lines.append(
                    f"| {c['model']} | {c['image_size']} | {c['batch_size']} | {c['variant']} | {ips} "
                    f"| {mem if mem is not None else '-'} | {note[:120]} |"
                )
            lines.append("")
    return "\n".join(lines)


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The options both benchmark scripts share."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="data.root (default: the embedded HAM10000 sample)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__)
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="experiment configs")
    p.add_argument("--skip-cpu", action="store_true", help="no CPU configs (only the GPU matrix)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, help="warm-up steps per arm (default: per config)")
    p.add_argument("--steps", type=int, help="timed steps per arm (default: per config)")
    p.add_argument("--eval-warmup", type=int, default=2, help="val batches of warm-up before the eval timing")
    p.add_argument("--eval-batches", type=int, help="val batches timed (default: the whole val split)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every arm (default: torch's default)")
    p.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override for the CPU configs, e.g. -o data.num_workers=0 (repeatable)",
    )
    p.add_argument("--no-loggers", action="store_true", help="Lightning arm without loggers (and LR monitor)")
    p.add_argument("--pretrained", action="store_true", help="load pretrained weights (default: random init)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per arm before it is killed")
    p.add_argument("--json", type=Path, help="write every raw number here")
    p.add_argument("--gpu", choices=("auto", "off"), default="auto", help="auto: run the GPU matrix if CUDA is there")
    p.add_argument("--gpu-matrix-on-cpu", action="store_true", help="run the GPU matrix on the CPU (code path check)")
    p.add_argument("--gpu-compile-on-cpu", action="store_true", help="include torch.compile in --gpu-matrix-on-cpu")
    p.add_argument(
        "--gpu-models",
        nargs="+",
        default=list(GPU_MODELS),
        metavar="MODEL:SIZE",
        help="lesionnet/conf/model group and square input size",
    )
    p.add_argument("--gpu-variants", nargs="+", default=list(GPU_VARIANTS), choices=list(GPU_VARIANTS))
    p.add_argument("--gpu-batch", type=int, default=32)
    p.add_argument("--gpu-warmup", type=int, default=5)
    p.add_argument("--gpu-steps", type=int, default=30)
    p.add_argument("--_worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--_spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        spec = json.loads(args._spec.read_text())
        with tempfile.TemporaryDirectory(prefix="lesionnet-bench-") as tmp:
            result = WORKERS[args._worker](spec, Path(tmp))
        args._out.write_text(json.dumps(result, indent=1))
        return 0

    report: dict[str, Any] = {
        "benchmark": "train_throughput",
        **run_metadata(),
        "target_ratio": TARGET_RATIO,
        "load_before": load_average(),
        "configs": {},
    }
    report["settings"] = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")
    }
    workdir = Path(tempfile.mkdtemp(prefix="lesionnet-throughput-"))
    try:
        configs = [] if args.skip_cpu else args.configs
        for r in range(1, args.rounds + 1 if configs else 1):
            for name in configs:
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
                row["train_ratio"] = round(
                    row["lightning"]["train"]["images_per_s"] / row["plain"]["train"]["images_per_s"], 4
                )
                row["eval_ratio"] = round(
                    row["lightning"]["eval"]["images_per_s"] / row["plain"]["eval"]["images_per_s"], 4
                )
                # CPU seconds per image (process + loader workers), plain/Lightning: < 1 = Lightning uses more CPU
                row["train_cpu_ratio"] = round(
                    row["plain"]["train"]["cpu_ms_per_image"] / row["lightning"]["train"]["cpu_ms_per_image"], 4
                )
                report["configs"].setdefault(name, {"rounds": []})["rounds"].append(row)
        for res in report["configs"].values():
            res["summary"] = summarise(res["rounds"])
        if args.gpu_matrix_on_cpu or (args.gpu == "auto" and cuda_available()):
            spec = {
                "on_cpu": args.gpu_matrix_on_cpu,
                "models": args.gpu_models,
                "variants": args.gpu_variants,
                "batch": args.gpu_batch,
                "warmup": args.gpu_warmup,
                "steps": args.gpu_steps,
                "compile_on_cpu": args.gpu_compile_on_cpu,
                "threads": args.threads,
                "loggers": not args.no_loggers,
            }
            report["gpu"] = run_worker("gpu", spec, workdir, args.timeout)
        else:
            report["gpu"] = {"skipped": "CUDA is not available" if args.gpu == "auto" else "--gpu off"}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return finish_report(report, markdown, args.json)


def finish_report(report: dict[str, Any], render: Callable[[dict[str, Any]], str], json_path: Path | None) -> int:
    """Stamp the end (time, load), print the markdown and write the JSON; shared with data_throughput.py."""
    report["load_after"] = load_average()
    report["end_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    print(render(report))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
