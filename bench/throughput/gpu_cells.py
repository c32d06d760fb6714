"""The GPU matrix's cells and the worker that measures them: model x input size x variant (precision, channels_last,
torch.compile) x trainer (single device or DDP), Lightning train img/s on a synthetic batch already on the device."""

from __future__ import annotations

import gc
import importlib
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import CONF, compose_config, set_threads, train_trainer_options
from .probes import Clock, clock_callback, load_average, max_rss_mb
from .run_info import cpu_info
from .workers import emit

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
# name: (precision, channels_last, compile)
GPU_VARIANTS: dict[str, tuple[str, bool, bool]] = {
    "fp32": ("32-true", False, False),
    "bf16": ("bf16-mixed", False, False),
    "bf16_cl": ("bf16-mixed", True, False),
    "bf16_cl_compile": ("bf16-mixed", True, True),
}


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
