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
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench/throughput: one module per concern (probes, run_info, config, plain_loop, arms, summary, workers, gpu_cells,
# gpu_schedule, markdown_report); this script is its command line and the entry point of its worker processes.
from throughput.arms import DEFAULT_CONFIGS, lightning_arm, plain_arm, run_round
from throughput.config import base_parser
from throughput.gpu_cells import (
    DRY_RUN_BATCH,
    DRY_RUN_OVERRIDES,
    DRY_RUN_SIZE,
    DRY_RUN_VARIANTS,
    GPU_BUDGET_S,
    GPU_CELL_TIMEOUT_S,
    GPU_COMPILE_MODELS,
    GPU_COMPILE_TIMEOUT_S,
    GPU_DDP_MODELS,
    GPU_DDP_VARIANTS,
    GPU_MODELS,
    GPU_VARIANTS,
    gpu_matrix,
    plan_gpu_cells,
)
from throughput.gpu_schedule import run_gpu_matrix
from throughput.markdown_report import (
    GPU_CHECK_DOC,
    GPU_CHECK_END,
    GPU_CHECK_START,
    finish_report,
    gpu_check_block,
    markdown,
    split_at_markers,
    write_between_markers,
)
from throughput.probes import load_average
from throughput.run_info import run_metadata
from throughput.summary import TARGET_RATIO, summarise

WORKERS: dict[str, Callable[[dict[str, Any], Path], dict[str, Any]]] = {
    "lightning": lightning_arm,
    "plain": plain_arm,
    "gpu": gpu_matrix,
}


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


if __name__ == "__main__":
    sys.exit(main())
