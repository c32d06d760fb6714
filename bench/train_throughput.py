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

GPU matrix (when CUDA is available, or on the CPU with ``--gpu-matrix-on-cpu``): the seed's networks at their native
input size (baseline CNN, VGG16 and DenseNet201 at 192x256, InceptionV3 and Inception-ResNet-V2 at 299x299) and
EfficientNet-Lite0 (224x224), fp32 vs bf16-mixed vs bf16-mixed + channels_last (+ ``torch.compile`` for the baseline
and Lite0), plus the baseline under ``trainer=ddp trainer.devices=1``: Lightning train img/s on a synthetic batch
already on the device (isolates the model from the data pipeline) and peak GPU memory. Cells run in worker processes
within ``--budget-s``; a cell that fails (OOM, compiler) or kills its worker is reported as failed and the rest go on.

``--gpu-check`` is the GPU check of issue 13 (only the matrix; the table written between the gpu-check markers of
docs/PERFORMANCE.md); ``--dry-run`` runs the same code on the CPU with tiny inputs (``bench/gpu_check.sh`` wraps it).

    python bench/train_throughput.py --root ../shared/data/ham10000_200x150 --json train_throughput.json
    python bench/train_throughput.py --configs baseline_cpu --rounds 1 --steps 20 --warmup 3
    python bench/train_throughput.py --gpu-check --json gpu_check.json                    # on a GPU, <= 8 min
    python bench/train_throughput.py --dry-run --doc /tmp/PERFORMANCE.md                 # the same code path, on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib
import json
import os
import platform
import resource
import shlex
import shutil
import signal
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
# The GPU check (issue 13): the seed's networks at their native input size (H x W), plus EfficientNet-Lite0 at its
# timm size.
GPU_MODELS = (
    "baseline:192x256",
    "vgg16:192x256",
    "inception_v3:299x299",
    "inception_resnet_v2:299x299",
    "densenet201:192x256",
    "efficientnet_lite0:224x224",
)
# torch.compile costs minutes per network: measured where it may pay, small nets whose step is mostly kernel launches
# and elementwise work (the baseline CNN, Lite0's depthwise blocks).
GPU_COMPILE_MODELS = ("baseline", "efficientnet_lite0")
GPU_DDP_MODELS = ("baseline:192x256",)  # trainer=ddp trainer.devices=1: what DDP costs over one device
GPU_DDP_VARIANTS = ("fp32", "bf16")
GPU_BUDGET_S = 480.0  # the whole matrix, so that the check (start-up included) fits a 10-minute slot
GPU_CELL_TIMEOUT_S = 120.0  # an eager cell takes seconds on a GPU: this catches a hang (a DDP rendezvous, say)
GPU_COMPILE_TIMEOUT_S = 300.0  # a compile cell: minutes of compilation first
# --dry-run: the smallest inputs each network accepts (the Inceptions' stems need >= 75 px), a batch of 2
DRY_RUN_SIZE = (32, 32)
DRY_RUN_SIZES = {"inception_v3": (75, 75), "inception_resnet_v2": (75, 75)}
DRY_RUN_BATCH = 2
# fp32 and bf16-mixed + channels_last cover every code path of the eager variants (plain bf16-mixed is the latter
# without channels_last) and keep the dry run near a minute on 2 busy cores
DRY_RUN_VARIANTS = ("fp32", "bf16_cl", "bf16_cl_compile")
# and the networks' bodies frozen: a step is then about a forward pass, where VGG16's 138M weights would otherwise
# take seconds of backward + AdamW per step on 2 CPU cores (the GPU check trains every layer, finetune=all)
DRY_RUN_OVERRIDES = ("finetune=head",)
GPU_CHECK_DOC = REPO / "docs" / "PERFORMANCE.md"
GPU_CHECK_START, GPU_CHECK_END = "<!-- gpu-check:start -->", "<!-- gpu-check:end -->"
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


def parse_model_size(item: str) -> tuple[str, int, int]:
    """``group:HxW`` or ``group:N`` (square) -> (model group, height, width), the group checked against the configs."""
    group, sep, size = item.partition(":")
    height_text, _, width_text = size.lower().partition("x")
    try:
        height, width = int(height_text), int(width_text or height_text)
    except ValueError:
        height = width = 0
    if not sep or not group or height < 1 or width < 1:
        raise ValueError(f"'{item}' is not MODEL:HxW or MODEL:N: write e.g. baseline:192x256 or inception_v3:299.")
    if not (CONF / "model" / f"{group}.yaml").is_file():
        known = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
        raise ValueError(f"'{item}': lesionnet/conf/model has no group '{group}'; use one of {known}.")
    return group, height, width


def cell_key(cell: dict[str, Any]) -> str:
    return f"{cell['model']}:{cell['input']}:{cell['variant']}:{'ddp' if cell['ddp'] else 'single'}"


def plan_gpu_cells(
    models: Sequence[str],
    variants: Sequence[str],
    compile_models: Sequence[str],
    ddp_models: Sequence[str],
    ddp_variants: Sequence[str],
    dry_run: bool = False,
) -> list[dict[str, Any]]:
    """Every cell of the matrix in table order: per model its variants (the compile variant only for
    ``compile_models``: compiling costs minutes, so it is measured where it may pay), then the DDP rows.
    ``dry_run`` replaces the sizes by the smallest each network accepts (the Inceptions need >= 75 px)."""

    def cell(item: str, variant: str, ddp: bool) -> dict[str, Any]:
        group, height, width = parse_model_size(item)
        if dry_run:
            height, width = DRY_RUN_SIZES.get(group, DRY_RUN_SIZE)
        return {"model": group, "input": f"{height}x{width}", "variant": variant, "ddp": ddp}

    cells = [
        cell(item, variant, False)
        for item in models
        for variant in variants
        if not GPU_VARIANTS[variant][2] or item.partition(":")[0] in compile_models
    ]
    return cells + [cell(item, variant, True) for item in ddp_models for variant in ddp_variants]


def emit(progress: Path, event: dict[str, Any]) -> None:
    """Append one event line for the driver, which reads the file while the worker runs (and after it died)."""
    with progress.open("a") as f:
        f.write(json.dumps({**event, "t": time.time()}) + "\n")
        f.flush()


def read_events(progress: Path) -> list[dict[str, Any]]:
    """The worker's events so far; a line still being written (or cut by a crash) is left out."""
    events = []
    try:
        lines = progress.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def load_training_stack() -> None:
    """Import torch, Lightning, Hydra and LesionNet up front: seconds that belong to no cell (nor its timeout)."""
    for name in ("lesionnet.training", "lesionnet.data.transforms"):
        importlib.import_module(name)


def device_info(on_cpu: bool) -> dict[str, Any]:
    """What the table's header says about the device: name, memory, CUDA/cuDNN, TF32 settings, driver."""
    import torch

    info: dict[str, Any] = {"on_cpu": on_cpu, "cuda_available": torch.cuda.is_available(), "synthetic_data": True}
    info["torch"] = torch.__version__
    if on_cpu:
        return {**info, "device_name": f"CPU: {cpu_info()['model']} (--gpu-matrix-on-cpu)"}
    if not torch.cuda.is_available():
        return info
    torch.zeros(1, device="cuda")  # the CUDA context now, not inside the first cell's warm-up
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = ""
    return {
        **info,
        "device_name": torch.cuda.get_device_name(0),
        "device_memory_gib": round(props.total_memory / 2**30, 1),
        "capability": list(torch.cuda.get_device_capability(0)),
        "driver": driver or None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }


def gpu_cell(spec: dict[str, Any], cell: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """Lightning train img/s of one model x variant (x DDP) on a synthetic batch already on the device."""
    import torch
    from hydra.utils import instantiate

    from lesionnet.classes import CLASS_NAMES
    from lesionnet.data.transforms import resolve_data_config
    from lesionnet.training import build_trainer

    cell_start = time.perf_counter()
    on_cpu, ddp = spec["on_cpu"], cell["ddp"]
    precision, channels_last, compiled = GPU_VARIANTS[cell["variant"]]
    height, width = (int(s) for s in cell["input"].split("x"))
    batch = spec["batch"]
    trainer_group = ("ddp_cpu" if on_cpu else "ddp") if ddp else ("cpu" if on_cpu else "gpu")
    cfg = compose_config(
        None,
        output_dir,
        None,
        [
            f"model={cell['model']}",
            f"trainer={trainer_group}",
            *(["trainer.devices=1"] if ddp else []),
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
    data_config = resolve_data_config(cfg.model.backbone, image_size=(height, width))
    model = instantiate(
        cfg.model, _recursive_=False, class_names=list(CLASS_NAMES), class_weights=None, data_config=data_config
    )
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=generator).to(device)
    targets = torch.randint(len(CLASS_NAMES), (batch,), generator=generator).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    clock = Clock(spec["warmup"], spec["steps"], sync=sync)
    train_trainer_options(cfg, clock.total)
    trainer = build_trainer(cfg)
    trainer.callbacks.append(clock_callback(clock))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    fit_start = time.perf_counter()
    trainer.fit(model, train_dataloaders=RepeatBatch((images, targets), clock.total))
    timed = clock.result()
    step_s = timed["seconds"] / timed["steps"]
    warmup_s = clock.t0 - fit_start  # Lightning's setup, moving the model, compiling (compile rows), warm-up steps
    result = {
        **cell,
        "backbone": cfg.model.backbone,
        "batch_size": batch,
        "precision": precision,
        "channels_last": channels_last,
        "compile": compiled,
        "trainer": trainer_group,
        "strategy": type(trainer.strategy).__name__,
        "world_size": trainer.world_size,
        "device": str(device),
        **timed,
        "ms_per_step": round(1000 * step_s, 2),
        "warmup_s": round(warmup_s, 2),
        "warmup_extra_s": round(max(warmup_s - clock.warmup * step_s, 0.0), 2),
        "cell_s": round(time.perf_counter() - cell_start, 2),
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
        "peak_gpu_memory_reserved_mb": (
            round(torch.cuda.max_memory_reserved() / 2**20, 1) if device.type == "cuda" else None
        ),
    }
    del trainer, model, images, targets
    release_device(compiled)
    return result


def release_device(compiled: bool) -> None:
    """Give the next cell a clean device: cached blocks, compiled graphs and a DDP process group go."""
    import torch

    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def budget_skip_reason(spec: dict[str, Any], longest_s: float) -> str | None:
    """Why a cell must not start: the budget left is less than the longest cell of its kind took so far."""
    left = spec["deadline"] - time.time()
    if left > longest_s:
        return None
    return (
        f"--budget-s {spec['budget_s']:g} reached ({max(left, 0):.0f} s left, a cell like this took {longest_s:.0f} s)"
    )


def gpu_matrix(spec: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """Worker: the cells of ``spec['cells']`` one after the other, each reported to ``spec['progress']`` as it ends.

    A cell that raises (OOM, compiler error) becomes an "error" entry and the next one runs; a cell that kills or
    hangs the process is found by the driver from the "start" event without its result."""
    set_threads(spec.get("threads"))
    load_training_stack()
    on_cpu, progress = spec["on_cpu"], Path(spec["progress"])
    info = device_info(on_cpu)
    emit(progress, {"event": "device", "info": info})
    longest = {False: 0.0, True: 0.0}  # per kind: eager, compiled (a compile cell takes minutes)
    for cell in spec["cells"]:
        compiled = GPU_VARIANTS[cell["variant"]][2]
        skipped = budget_skip_reason(spec, longest[compiled])
        if skipped:
            emit(progress, {"event": "cell", "cell": {**cell, "skipped": skipped}})
            continue
        emit(progress, {"event": "start", "key": cell_key(cell), "compile": compiled})
        start = time.perf_counter()
        try:
            if not on_cpu and not info["cuda_available"]:
                raise RuntimeError("CUDA is not available in the worker process")
            result = gpu_cell(spec, cell, output_dir / cell_key(cell).replace(":", "_"))
        except Exception as err:  # one failing cell (OOM, compiler) must not lose the others
            result = {**cell, "error": f"{type(err).__name__}: {err}"[:2000]}
        if "error" in result:  # after the except block: its traceback no longer holds the cell's tensors
            release_device(compiled)
        longest[compiled] = max(longest[compiled], time.perf_counter() - start)
        emit(progress, {"event": "cell", "cell": result})
    return {**info, "max_rss_mb": round(max_rss_mb(), 1), "load_after": load_average()}


# --------------------------------------------------------------------------------------------------- the driver
WORKERS: dict[str, Callable[[dict[str, Any], Path], dict[str, Any]]] = {
    "lightning": lightning_arm,
    "plain": plain_arm,
    "gpu": gpu_matrix,
}


class WorkerError(RuntimeError):
    """A worker process that failed, died or was stopped: ``reason`` in one line, ``log_tail`` its last output."""

    def __init__(self, tag: str, reason: str, log_tail: str) -> None:
        super().__init__(f"{tag} failed ({reason}):\n{log_tail}")
        self.reason, self.log_tail = reason, log_tail


def stop_process_group(proc: subprocess.Popen) -> None:
    """Kill the worker with its children (loader workers, compiler processes): it leads its own process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_or_stop(proc: subprocess.Popen, timeout: float, watch: Callable[[], str | None] | None) -> str | None:
    """Wait for the worker; stop it past ``timeout`` or when ``watch`` (polled twice a second) gives a reason."""
    end = time.monotonic() + timeout
    try:
        while True:
            try:
                proc.wait(timeout=0.5)
                return None
            except subprocess.TimeoutExpired:
                pass
            reason = f"ran past --timeout {timeout:g} s" if time.monotonic() > end else (watch() if watch else None)
            if reason:
                stop_process_group(proc)
                return reason
    except BaseException:  # Ctrl-C: the worker is in its own session and would not get the signal
        stop_process_group(proc)
        raise


def run_worker(
    kind: str,
    spec: dict[str, Any],
    workdir: Path,
    timeout: float,
    watch: Callable[[], str | None] | None = None,
) -> dict[str, Any]:
    """One arm (or a GPU matrix worker) in a fresh interpreter; its stdout/stderr (progress bar included) go to a
    log file. Raises WorkerError when it fails, dies, or is stopped by ``timeout`` or ``watch``."""
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
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        stopped = wait_or_stop(proc, timeout, watch)
    if stopped or proc.returncode != 0 or not out_file.is_file():
        tail = log_file.read_text(errors="replace")[-3000:]
        raise WorkerError(tag, stopped or f"exit {proc.returncode}", tail)
    return json.loads(out_file.read_text())


def describe_cell(cell: dict[str, Any]) -> str:
    name = f"{cell['model']} {cell['input']} {cell['variant']}{' DDP' if cell['ddp'] else ''}"
    if "images_per_s" in cell:
        return f"{name}: {cell['images_per_s']:.1f} img/s ({cell['cell_s']:.0f} s)"
    if "error" in cell:
        return f"{name}: failed: {first_line(cell['error'], table=False)}"
    return f"{name}: skipped: {cell['skipped']}"


class MatrixWatch:
    """Polled by run_worker: stops a GPU matrix worker at the budget's deadline or when one cell runs past its
    timeout, and prints each cell's result as it arrives (the worker's own output goes to its log file)."""

    def __init__(self, progress: Path, spec: dict[str, Any]) -> None:
        self.progress, self.spec, self.printed = progress, spec, 0

    def __call__(self) -> str | None:
        events = read_events(self.progress)
        self.print_new(events)
        if time.time() >= self.spec["deadline"]:
            return f"stopped at the --budget-s {self.spec['budget_s']:g} deadline"
        last = events[-1] if events else {}
        if last.get("event") != "start":
            return None
        option = "compile_timeout_s" if last.get("compile") else "cell_timeout_s"
        if time.time() - last["t"] > self.spec[option]:
            return f"stopped after --{option.replace('_', '-')} {self.spec[option]:g}"
        return None

    def print_new(self, events: list[dict[str, Any]]) -> None:
        cells = [e["cell"] for e in events if e["event"] == "cell"]
        for cell in cells[self.printed :]:
            print(f"GPU matrix: {describe_cell(cell)}", file=sys.stderr, flush=True)
        self.printed = len(cells)


def lost_cell_reason(failure: WorkerError | None) -> str:
    """Why a cell that started has no result: how its worker ended, and the last line the worker printed."""
    if failure is None:
        return "the worker ended without a result for this cell"
    lines = [line.strip() for line in failure.log_tail.splitlines() if line.strip()]
    return f"worker {failure.reason}" + (f"; its last output: {lines[-1][:300]}" if lines else "")


def run_gpu_matrix(
    spec: dict[str, Any],
    cells: list[dict[str, Any]],
    workdir: Path,
    timeout: float,
    launch: Callable[..., dict[str, Any]] = run_worker,
) -> dict[str, Any]:
    """The matrix in worker processes: eager and DDP cells in one, the compile cells in a fresh one (clean compiler
    state). A worker that dies or is stopped loses only the cell it was in (a "failed" entry with the reason); a
    new worker takes the cells after it. Returns the device info and one entry per cell, in ``cells``' order."""
    results: dict[str, dict[str, Any]] = {}
    info: dict[str, Any] = {}
    for cell in cells:
        if spec["on_cpu"] and GPU_VARIANTS[cell["variant"]][2] and not spec.get("compile_on_cpu"):
            results[cell_key(cell)] = {**cell, "skipped": "torch.compile is not run on the CPU (--gpu-compile-on-cpu)"}
    attempt = 0
    for compiled in (False, True):
        pending = [c for c in cells if GPU_VARIANTS[c["variant"]][2] == compiled and cell_key(c) not in results]
        while pending:
            if time.time() >= spec["deadline"]:
                for cell in pending:
                    results[cell_key(cell)] = {**cell, "skipped": f"--budget-s {spec['budget_s']:g} used up"}
                break
            attempt += 1
            progress = workdir / f"gpu_progress_{attempt}.jsonl"
            worker_spec = {**spec, "cells": pending, "progress": str(progress), "round": attempt}
            watch = MatrixWatch(progress, spec)
            failure = None
            try:
                info.update(launch("gpu", worker_spec, workdir, timeout, watch=watch))
            except WorkerError as err:
                failure = err
            events = read_events(progress)
            watch.print_new(events)
            for event in events:
                if event["event"] == "device":
                    info.update(event["info"])
                elif event["event"] == "cell":
                    results[cell_key(event["cell"])] = event["cell"]
            lost = [key for key in (e["key"] for e in events if e["event"] == "start") if key not in results]
            for cell in pending:
                if cell_key(cell) in lost:
                    results[cell_key(cell)] = {**cell, "error": lost_cell_reason(failure)}
                    print(f"GPU matrix: {describe_cell(results[cell_key(cell)])}", file=sys.stderr, flush=True)
            pending = [c for c in pending if cell_key(c) not in results]
            if pending and not lost and time.time() < spec["deadline"]:
                # it ended before starting a cell (an import error, say): a new worker would too
                for cell in pending:
                    results[cell_key(cell)] = {**cell, "error": lost_cell_reason(failure)}
                pending = []
    return {**info, "cells": [results[cell_key(c)] for c in cells]}


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
            lines += [f"Device: {gpu.get('device_name', 'unknown')}", "", *gpu_table(gpu), ""]
    return "\n".join(lines)


VARIANT_LABELS = {
    "fp32": "fp32",
    "bf16": "bf16-mixed",
    "bf16_cl": "bf16-mixed + channels_last",
    "bf16_cl_compile": "bf16-mixed + channels_last + torch.compile",
}


def first_line(text: str, limit: int = 160, table: bool = True) -> str:
    """One line of an error message, its pipes escaped for a markdown table."""
    line = next((x.strip() for x in str(text).splitlines() if x.strip()), "")
    line = line[: limit - 3] + "..." if len(line) > limit else line
    return line.replace("|", "\\|") if table else line


def compile_note(cell: dict[str, Any], eager: dict[str, Any]) -> str:
    """Does torch.compile pay? Speed-up over the same variant without it, and the steps that repay compiling."""
    speedup = cell["images_per_s"] / eager["images_per_s"]
    compile_s = max(cell["warmup_extra_s"] - eager["warmup_extra_s"], 0.0)
    saved_ms = eager["ms_per_step"] - cell["ms_per_step"]
    note = f"{speedup:.2f}x eager bf16 + channels_last; compiling took ~{compile_s:.0f} s"
    if saved_ms <= 0:
        return note + ": does not pay"
    return note + f", repaid after ~{1000 * compile_s / saved_ms:,.0f} steps"


def gpu_table(gpu: dict[str, Any]) -> list[str]:
    """The matrix as markdown: one row per model x variant (DDP rows last), a number or why there is none."""
    cells = gpu.get("cells", [])
    measured = {(c["model"], c["input"], c["variant"], c["ddp"]): c for c in cells if "images_per_s" in c}
    lines = [
        "| model | backbone | input (HxW) | trainer | variant | train img/s | ms/step | vs fp32 | peak GPU MiB "
        "| warm-up extra s | note |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in cells:
        trainer = "DDP, 1 device" if c["ddp"] else "single device"
        head = f"| {c['model']} | {c.get('backbone', '')} | {c['input']} | {trainer} | {VARIANT_LABELS[c['variant']]} "
        if "images_per_s" not in c:
            reason = f"failed: {first_line(c['error'])}" if "error" in c else f"skipped: {c.get('skipped')}"
            lines.append(head + f"| - | - | - | - | - | {reason} |")
            continue
        fp32 = measured.get((c["model"], c["input"], "fp32", c["ddp"]))
        notes = []
        eager = measured.get((c["model"], c["input"], "bf16_cl", c["ddp"]))
        if c["compile"] and eager:
            notes.append(compile_note(c, eager))
        single = measured.get((c["model"], c["input"], c["variant"], False))
        if c["ddp"] and single:
            notes.append(f"{c['images_per_s'] / single['images_per_s']:.2f}x the single-device row")
        vs_fp32 = f"{c['images_per_s'] / fp32['images_per_s']:.2f}x" if fp32 else "-"
        memory = c.get("peak_gpu_memory_mb")
        memory_text = f"{memory:.0f}" if memory is not None else "-"
        lines.append(
            head + f"| {c['images_per_s']:.1f} | {c['ms_per_step']:.1f} | {vs_fp32} | {memory_text} "
            f"| {c['warmup_extra_s']:.1f} | {'; '.join(notes)} |"
        )
    return lines


def gpu_check_command() -> str:
    """The command as typed (the wrapper's name when it ran it), for the table's header."""
    script = os.path.relpath(Path(sys.argv[0]).resolve(), REPO) if sys.argv else "bench/train_throughput.py"
    args = shlex.join([script, *sys.argv[1:]])
    wrapper = os.environ.get("GPU_CHECK_WRAPPER")
    return f"{wrapper}  # runs: python {args}" if wrapper else f"python {args}"


def gpu_check_block(report: dict[str, Any]) -> str:
    """What goes between the markers of docs/PERFORMANCE.md: when, where, how, and the table."""
    gpu, settings, found = report["gpu"], report["settings"], report["versions"]
    git = report.get("git") or {}
    commit = f"`{str(git['commit'])[:10]}`" if git.get("commit") else "unknown (no git checkout)"
    if git.get("dirty_files"):
        commit += f" with {git['dirty_files']} uncommitted file(s)"
    on_cpu = bool(gpu.get("on_cpu"))
    lines = []
    if settings.get("dry_run"):
        eager = [VARIANT_LABELS[v] for v in settings["gpu_variants"] if not GPU_VARIANTS[v][2]]
        lines += [
            f"**Dry run on the CPU** (`--dry-run`: tiny inputs, batch {DRY_RUN_BATCH}, 1 warm-up + 1 timed step, the "
            f"networks' bodies frozen with `{' '.join(DRY_RUN_OVERRIDES)}`, {' and '.join(eager)}; the torch.compile "
            "rows listed, not run): it checks the code path and the table; these are **not GPU figures**.",
            "",
        ]
    device = f"**{gpu.get('device_name', 'an unknown device')}**"
    if gpu.get("device_memory_gib"):
        device += (
            f" ({gpu['device_memory_gib']} GiB, compute capability {'.'.join(map(str, gpu['capability']))}, "
            f"driver {gpu.get('driver') or 'unknown'})"
        )
    cuda = f", CUDA {gpu['cuda']}, cuDNN {gpu['cudnn']}" if gpu.get("cuda") else ""
    trainers = "`trainer=cpu`; the DDP rows `trainer=ddp_cpu" if on_cpu else "`trainer=gpu`; the DDP rows `trainer=ddp"
    loggers = (
        "without loggers"
        if settings.get("no_loggers")
        else "with the progress bar and CSV + TensorBoard loggers on, as in training"
    )
    lines += [
        f"Measured {report['date_utc']} to {report.get('end_utc', '?')} on {device}, "
        f"{report['cpu']['usable_cpus']} CPU cores; torch {gpu.get('torch', found.get('torch'))}{cuda}, "
        f"lightning {found.get('lightning')}, timm {found.get('timm')}, Python {found.get('python')}; "
        f"commit {commit}. Command:",
        "",
        "```bash",
        gpu_check_command(),
        "```",
        "",
        f"Each row: `Trainer.fit` of `LesionClassifier` (`lesionnet.training.build_trainer`, {trainers} "
        "trainer.devices=1`) with `model.pretrained=false`, the model's own optimizer and "
        f"{'`finetune=head`' if settings.get('dry_run') else '`finetune=all` (every layer trained)'}, on one "
        f"synthetic batch of {settings['gpu_batch']} images already on the device (no data pipeline: the model alone), "
        f"{settings['gpu_warmup']} warm-up + {settings['gpu_steps']} timed steps "
        f"{'' if on_cpu else '(CUDA-synchronised at both ends) '}{loggers}. Peak = "
        "`torch.cuda.max_memory_allocated`. Warm-up extra = the warm-up's wall time minus its steps at the timed pace "
        "(Lightning's setup; in the compile rows, the compilation).",
    ]
    if not on_cpu:
        lines[-1] += (
            f" fp32 = torch's defaults: TF32 convolutions {'on' if gpu.get('cudnn_allow_tf32') else 'off'}, TF32 "
            f"matmuls {'on' if gpu.get('matmul_allow_tf32') else 'off'}, `cudnn.benchmark` "
            f"{'on' if gpu.get('cudnn_benchmark') else 'off'}."
        )
    lines[-1] += f" Budget `--budget-s {settings['budget_s']:g}`: the matrix took {gpu.get('elapsed_s', 0):.0f} s."
    return "\n".join([*lines, "", *gpu_table(gpu)])


def split_at_markers(text: str, path: Path) -> tuple[str, str]:
    """The text before the start marker and from the end marker on; exactly one of each, in that order."""
    starts, ends = text.count(GPU_CHECK_START), text.count(GPU_CHECK_END)
    if starts != 1 or ends != 1 or text.index(GPU_CHECK_START) > text.index(GPU_CHECK_END):
        raise ValueError(
            f"{path} needs exactly one '{GPU_CHECK_START}' line and, after it, one '{GPU_CHECK_END}' line (found "
            f"{starts} and {ends}): put them back in its GPU section (the table goes between them), or give --doc "
            "another file."
        )
    before, rest = text.split(GPU_CHECK_START)
    return before, rest[rest.index(GPU_CHECK_END) :]


def write_between_markers(path: Path, block: str) -> None:
    """Replace what stands between the gpu-check markers of ``path`` by ``block`` (the rest of the file untouched)."""
    before, after = split_at_markers(path.read_text(), path)
    tmp = path.with_name(f".{path.name}.tmp")
    # blank lines around the block, so that markdown ends the table before the end marker
    tmp.write_text(f"{before}{GPU_CHECK_START}\n\n{block.strip()}\n\n{after}")
    tmp.replace(path)


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
        metavar="MODEL:HxW",
        help="lesionnet/conf/model group and input size, HxW or N for NxN (default: the seed's networks)",
    )
    p.add_argument("--gpu-variants", nargs="+", default=list(GPU_VARIANTS), choices=list(GPU_VARIANTS))
    p.add_argument(
        "--gpu-compile-models",
        nargs="*",
        default=list(GPU_COMPILE_MODELS),
        metavar="MODEL",
        help="the model groups that get the torch.compile variant (compiling takes minutes)",
    )
    p.add_argument(
        "--gpu-ddp-models",
        nargs="*",
        default=list(GPU_DDP_MODELS),
        metavar="MODEL:HxW",
        help="also run these under trainer=ddp trainer.devices=1 (none: no DDP rows)",
    )
    eager = [v for v, (_, _, compiled) in GPU_VARIANTS.items() if not compiled]
    p.add_argument("--gpu-ddp-variants", nargs="+", default=list(GPU_DDP_VARIANTS), choices=eager)
    p.add_argument("--gpu-batch", type=int, default=32)
    p.add_argument("--gpu-warmup", type=int, default=10)
    p.add_argument("--gpu-steps", type=int, default=50)
    p.add_argument(
        "--budget-s",
        type=float,
        default=GPU_BUDGET_S,
        help="seconds for the whole GPU matrix: no cell starts that would not fit (judged by the longest cell of its "
        "kind so far), a cell still running at the deadline is stopped, the rest are reported as skipped",
    )
    p.add_argument(
        "--cell-timeout-s", type=float, default=GPU_CELL_TIMEOUT_S, help="stop an eager GPU matrix cell running longer"
    )
    p.add_argument(
        "--compile-timeout-s",
        type=float,
        default=GPU_COMPILE_TIMEOUT_S,
        help="stop a torch.compile cell running longer (compilation included)",
    )
    p.add_argument(
        "--gpu-check",
        action="store_true",
        help="the GPU check of issue 13: only the GPU matrix (needs CUDA), its table written into --doc",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help=f"the --gpu-check code path on the CPU: the same networks at {DRY_RUN_SIZE[0]}x{DRY_RUN_SIZE[1]} "
        f"(Inceptions 75x75), batch {DRY_RUN_BATCH}, 1 warm-up + 1 timed step, bodies frozen, variants "
        f"{' '.join(DRY_RUN_VARIANTS)} unless --gpu-variants is given, no torch.compile; writes --doc only when "
        "given, never docs/PERFORMANCE.md",
    )
    p.add_argument(
        "--doc",
        type=Path,
        help=f"markdown file whose {GPU_CHECK_START} ... {GPU_CHECK_END} block gets the table "
        "(--gpu-check default: docs/PERFORMANCE.md)",
    )
    p.add_argument("--table", type=Path, help="with --gpu-check: also write the block (header + table) to this file")
    p.add_argument("--_worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--_spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_check_doc(args: argparse.Namespace) -> Path | None:
    """Where --gpu-check writes its table, checked before minutes are spent measuring."""
    doc = args.doc if args.doc or args.dry_run else GPU_CHECK_DOC
    if doc is None:
        return None
    if args.dry_run and doc.resolve() == GPU_CHECK_DOC.resolve():
        raise ValueError(
            "--dry-run measures the CPU: writing it into docs/PERFORMANCE.md would replace the GPU figures. "
            "Give --doc a copy (e.g. --doc /tmp/PERFORMANCE.md) or leave --doc out."
        )
    if not doc.is_file():
        raise ValueError(f"--doc {doc}: no such file. Give an existing markdown file with the gpu-check markers.")
    split_at_markers(doc.read_text(), doc)
    return doc


def prepare_gpu_check(args: argparse.Namespace) -> Path | None:
    """--gpu-check / --dry-run settings; returns the file to write the table into (None: print only)."""
    if args.dry_run:
        args.gpu_check = args.gpu_matrix_on_cpu = True
        args.gpu_batch, args.gpu_warmup, args.gpu_steps = DRY_RUN_BATCH, 1, 1
        if args.gpu_variants == list(GPU_VARIANTS):  # the default: the dry run's own
            args.gpu_variants = list(DRY_RUN_VARIANTS)
    if not args.gpu_check:
        return None
    args.skip_cpu = True
    doc = gpu_check_doc(args)
    if not args.gpu_matrix_on_cpu and not cuda_available():
        raise ValueError(
            "CUDA is not available here: run the GPU check on a GPU machine (bash bench/gpu_check.sh), or add "
            "--dry-run to run its code path on the CPU."
        )
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        spec = json.loads(args._spec.read_text())
        with tempfile.TemporaryDirectory(prefix="lesionnet-bench-") as tmp:
            result = WORKERS[args._worker](spec, Path(tmp))
        args._out.write_text(json.dumps(result, indent=1))
        return 0
    try:
        doc = prepare_gpu_check(args)
        cells = plan_gpu_cells(
            args.gpu_models,
            args.gpu_variants,
            args.gpu_compile_models,
            args.gpu_ddp_models,
            args.gpu_ddp_variants,
            dry_run=args.dry_run,
        )
    except ValueError as err:
        print(f"train_throughput.py: error: {err}", file=sys.stderr)
        return 2

    report: dict[str, Any] = {
        "benchmark": "gpu_check" if args.gpu_check else "train_throughput",
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
                report["configs"].setdefault(name, {"rounds": []})["rounds"].append(run_round(args, name, r, workdir))
        for res in report["configs"].values():
            res["summary"] = summarise(res["rounds"])
        if args.gpu_check or args.gpu_matrix_on_cpu or (args.gpu == "auto" and cuda_available()):
            start = time.time()
            spec = {
                "on_cpu": args.gpu_matrix_on_cpu,
                "batch": args.gpu_batch,
                "warmup": args.gpu_warmup,
                "steps": args.gpu_steps,
                "compile_on_cpu": args.gpu_compile_on_cpu,
                "threads": args.threads,
                "loggers": not args.no_loggers,
                "overrides": list(DRY_RUN_OVERRIDES) if args.dry_run else [],
                "budget_s": args.budget_s,
                "deadline": start + args.budget_s,
                "cell_timeout_s": args.cell_timeout_s,
                "compile_timeout_s": args.compile_timeout_s,
            }
            report["gpu"] = run_gpu_matrix(spec, cells, workdir, args.timeout)
            report["gpu"].update(budget_s=args.budget_s, elapsed_s=round(time.time() - start, 1))
        else:
            report["gpu"] = {"skipped": "CUDA is not available" if args.gpu == "auto" else "--gpu off"}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if not args.gpu_check:
        return finish_report(report, markdown, args.json)
    finish_report(report, gpu_check_block, args.json)
    block = gpu_check_block(report)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(block + "\n")
    if not any("images_per_s" in c for c in report["gpu"]["cells"]):
        print(
            "train_throughput.py: error: no GPU matrix cell was measured (the notes say why); the docs are left as "
            "they were.",
            file=sys.stderr,
        )
        return 1
    if doc is not None:
        write_between_markers(doc, block)
        print(f"Table written between the gpu-check markers of {doc}", file=sys.stderr)
    return 0


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
