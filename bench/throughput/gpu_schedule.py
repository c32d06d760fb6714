"""Scheduling the GPU matrix over worker processes within the budget: eager and DDP cells in one worker, compile
cells in a fresh one; a worker that dies or hangs loses only its current cell, and a new one takes the rest."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .gpu_cells import GPU_VARIANTS, cell_key
from .markdown_report import first_line
from .workers import WorkerError, read_events, run_worker


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
