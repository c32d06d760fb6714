"""What the benchmark writes: the CPU rounds and the GPU matrix as markdown, the GPU check's block between the
gpu-check markers of docs/PERFORMANCE.md, and the JSON of every raw number."""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import REPO
from .gpu_cells import DRY_RUN_BATCH, DRY_RUN_OVERRIDES, GPU_VARIANTS
from .probes import load_average
from .summary import TARGET_RATIO

GPU_CHECK_DOC = REPO / "docs" / "PERFORMANCE.md"
GPU_CHECK_START, GPU_CHECK_END = "<!-- gpu-check:start -->", "<!-- gpu-check:end -->"


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


def finish_report(report: dict[str, Any], render: Callable[[dict[str, Any]], str], json_path: Path | None) -> int:
    """Stamp the end (time, load), print the markdown and write the JSON; shared with data_throughput.py."""
    report["load_after"] = load_average()
    report["end_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    print(render(report))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1))
    return 0
