"""Smoke tests of the throughput benchmarks (bench/train_throughput.py and its parts in bench/throughput/,
bench/data_throughput.py).

Tiny settings on the embedded sample: they check that every arm runs and that the JSON holds positive numbers
under the expected keys, never the timings themselves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT

BENCH = REPO_ROOT / "bench"
TINY = ["-o", "data.image_size=[24,32]", "-o", "data.num_workers=0"]


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def load_bench_module() -> Any:
    """The script bench/train_throughput.py as a module (its command line: ``main``)."""
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_module(name: str) -> Any:
    """``throughput.<name>``: a part of bench/train_throughput.py, imported with bench/ on sys.path as the script
    imports it."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(f"throughput.{name}")


def positive(*values: Any) -> bool:
    return all(isinstance(v, int | float) and v > 0 for v in values)


@pytest.fixture(scope="module")
def train_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    out = tmp_path_factory.mktemp("bench") / "train.json"
    proc = run_script(
        "train_throughput.py",
        "--configs",
        "baseline_cpu",
        "cpu_lite0_all",
        "--rounds",
        "1",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--eval-warmup",
        "1",
        "--eval-batches",
        "1",
        "--gpu",
        "off",
        *TINY,
        "--json",
        str(out),
    )
    return json.loads(out.read_text()), proc.stdout, out


def test_train_throughput_reports_both_arms_per_round(train_report: tuple[dict[str, Any], str, Path]) -> None:
    report, stdout, _ = train_report
    for key in ("date_utc", "git", "versions", "cpu", "load_before", "load_after", "settings", "target_ratio"):
        assert key in report
    assert {"torch", "lightning", "timm"} <= set(report["versions"])
    assert report["cpu"]["model"] and report["cpu"]["usable_cpus"] >= 1
    assert set(report["configs"]) == {"baseline_cpu", "cpu_lite0_all"}
    for name, res in report["configs"].items():
        (row,) = res["rounds"]
        assert sorted(row["order"]) == ["lightning", "plain"]
        for arm in ("lightning", "plain"):
            r = row[arm]
            assert r["arm"] == arm and r["config"] == name and r["image_size"] == [24, 32]
            assert r["train"]["steps"] == 2 and r["train"]["images"] == 2 * r["batch_size"]
            assert positive(
                r["train"]["images_per_s"],
                r["train"]["seconds"],
                r["train"]["cpu_ms_per_image"],
                r["eval"]["images_per_s"],
                r["eval"]["images"],
                r["max_rss_mb"],
                r["torch_threads"],
            )
        assert row["lightning"]["pid"] != row["plain"]["pid"]  # a fresh process per arm
        assert "TQDMProgressBar" in row["lightning"]["callbacks"]
        assert not {"ModelCheckpoint", "EarlyStopping", "EMAWeightAveraging"} & set(row["lightning"]["callbacks"])
        assert positive(row["train_ratio"], row["eval_ratio"], row["train_cpu_ratio"])
        assert res["summary"]["median_train_ratio"] == row["train_ratio"]
    assert report["configs"]["cpu_lite0_all"]["rounds"][0]["plain"]["channels_last"] is True
    assert report["gpu"] == {"skipped": "--gpu off"}
    assert "| round | order |" in stdout and "Median ratio Lightning/plain" in stdout


def table_rows(markdown_text: str) -> dict[tuple[str, str, str, str], dict[str, str]]:
    """The GPU table's rows keyed by (model, input, trainer, variant), each a dict of column -> cell text."""
    lines = [line for line in markdown_text.splitlines() if line.startswith("| ")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        row = dict(zip(header, (c.strip() for c in line.strip("|").split(" | ")), strict=True))
        rows[row["model"], row["input (HxW)"], row["trainer"], row["variant"]] = row
    return rows


@pytest.mark.slow
def test_gpu_check_dry_run_writes_the_table_between_the_markers(tmp_path: Path) -> None:
    """The GPU check's --dry-run: every cell of the real matrix at tiny sizes on the CPU, its table written into a
    copy of docs/PERFORMANCE.md between the markers (replaced, not added), the rest of the file untouched."""
    gpu_cells, markdown_report = bench_module("gpu_cells"), bench_module("markdown_report")
    doc, out, table = tmp_path / "PERFORMANCE.md", tmp_path / "gpu_check.json", tmp_path / "gpu_check.md"
    original = (REPO_ROOT / "docs" / "PERFORMANCE.md").read_text()
    doc.write_text(original)
    proc = run_script("train_throughput.py", "--dry-run", "--doc", str(doc), "--json", str(out), "--table", str(table))

    gpu = json.loads(out.read_text())["gpu"]
    assert gpu["on_cpu"] is True and gpu["synthetic_data"] is True
    planned = gpu_cells.plan_gpu_cells(
        gpu_cells.GPU_MODELS,
        gpu_cells.DRY_RUN_VARIANTS,
        gpu_cells.GPU_COMPILE_MODELS,
        gpu_cells.GPU_DDP_MODELS,
        gpu_cells.GPU_DDP_VARIANTS,
        True,
    )
    assert [gpu_cells.cell_key(c) for c in gpu["cells"]] == [gpu_cells.cell_key(c) for c in planned]
    assert {c["model"] for c in planned} == {item.split(":")[0] for item in gpu_cells.GPU_MODELS}

    text = doc.read_text()
    assert text.count(markdown_report.GPU_CHECK_START) == 1 and text.count(markdown_report.GPU_CHECK_END) == 1
    before, after = markdown_report.split_at_markers(text, doc)
    assert (before, after) == markdown_report.split_at_markers(original, doc)  # the rest of the file is untouched
    block = table.read_text().strip()
    assert text == f"{before}{markdown_report.GPU_CHECK_START}\n\n{block}\n\n{after}"
    assert "Not yet measured" not in block and "Dry run on the CPU" in block and "--dry-run" in block
    rows = table_rows(block)
    assert len(rows) == len(planned)
    for cell in planned:
        trainer = "DDP, 1 device" if cell["ddp"] else "single device"
        row = rows[cell["model"], cell["input"], trainer, markdown_report.VARIANT_LABELS[cell["variant"]]]
        if gpu_cells.GPU_VARIANTS[cell["variant"]][2]:
            assert row["note"].startswith("skipped: torch.compile"), row
        elif cell["variant"] == "fp32":  # fp32 runs on any CPU
            assert float(row["train img/s"]) > 0 and float(row["ms/step"]) > 0, row
        else:  # bf16 where the CPU supports it, else the reason
            assert row["note"].startswith("failed: ") or float(row["train img/s"]) > 0, row
    assert "| model | backbone |" in proc.stdout

    markdown_report.write_between_markers(doc, block)  # a second run replaces its own block
    assert doc.read_text() == text


def test_gpu_cells_are_planned_from_model_and_size(tmp_path: Path) -> None:
    gpu_cells = bench_module("gpu_cells")
    assert gpu_cells.parse_model_size("inception_v3:299") == ("inception_v3", 299, 299)
    assert gpu_cells.parse_model_size("baseline:192x256") == ("baseline", 192, 256)
    for bad, message in (("baseline", "MODEL:HxW"), ("baseline:0x5", "MODEL:HxW"), ("resnet9:64", "no group")):
        with pytest.raises(ValueError, match=message):
            gpu_cells.parse_model_size(bad)
    cells = gpu_cells.plan_gpu_cells(
        ["baseline:192x256", "vgg16:192x256"], list(gpu_cells.GPU_VARIANTS), ["baseline"], [], []
    )
    assert [(c["model"], c["variant"]) for c in cells] == [
        ("baseline", "fp32"),
        ("baseline", "bf16"),
        ("baseline", "bf16_cl"),
        ("baseline", "bf16_cl_compile"),  # compile only where asked
        ("vgg16", "fp32"),
        ("vgg16", "bf16"),
        ("vgg16", "bf16_cl"),
    ]
    dry = gpu_cells.plan_gpu_cells(
        ["inception_v3:299", "densenet201:192x256"], ["fp32"], [], ["baseline:192x256"], ["bf16"], True
    )
    assert [(c["model"], c["input"], c["ddp"]) for c in dry] == [
        ("inception_v3", "75x75", False),
        ("densenet201", "32x32", False),
        ("baseline", "32x32", True),
    ]


def test_markers_are_checked_before_anything_is_written(tmp_path: Path) -> None:
    tt, markdown_report = load_bench_module(), bench_module("markdown_report")
    doc = tmp_path / "doc.md"
    doc.write_text(
        f"# T\nbefore\n{markdown_report.GPU_CHECK_START}\nold table\n{markdown_report.GPU_CHECK_END}\nafter\n"
    )
    markdown_report.write_between_markers(doc, "new table\n")
    markdown_report.write_between_markers(doc, "new table")
    assert (
        doc.read_text()
        == f"# T\nbefore\n{markdown_report.GPU_CHECK_START}\n\nnew table\n\n{markdown_report.GPU_CHECK_END}\nafter\n"
    )
    for broken in (
        "no markers\n",
        f"{markdown_report.GPU_CHECK_START}\n{markdown_report.GPU_CHECK_START}\n{markdown_report.GPU_CHECK_END}\n",
    ):
        doc.write_text(broken)
        with pytest.raises(ValueError, match="needs exactly one"):
            markdown_report.write_between_markers(doc, "table")
        assert doc.read_text() == broken
    code = tt.main(["--dry-run", "--doc", str(REPO_ROOT / "docs" / "PERFORMANCE.md")])
    assert code == 2  # a CPU dry run never overwrites the GPU figures


def fake_cell(gpu_cells: Any, cell: dict[str, Any], images_per_s: float, ms_per_step: float, extra_s: float) -> dict:
    return {
        **cell,
        "backbone": f"{cell['model']}.fake",
        "compile": gpu_cells.GPU_VARIANTS[cell["variant"]][2],
        "images_per_s": images_per_s,
        "ms_per_step": ms_per_step,
        "warmup_extra_s": extra_s,
        "cell_s": 1.0,
        "peak_gpu_memory_mb": 1234.0,
    }


def test_gpu_matrix_worker_keeps_going_after_a_failing_cell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_cells, workers = bench_module("gpu_cells"), bench_module("workers")
    cells = gpu_cells.plan_gpu_cells(["baseline:32"], ["fp32", "bf16", "bf16_cl"], [], [], [])
    released = []

    def cell_or_oom(spec: dict[str, Any], cell: dict[str, Any], output_dir: Path) -> dict[str, Any]:
        if cell["variant"] == "bf16":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return fake_cell(gpu_cells, cell, 100.0, 10.0, 0.5)

    monkeypatch.setattr(gpu_cells, "set_threads", lambda threads: None)
    monkeypatch.setattr(gpu_cells, "load_training_stack", lambda: None)
    monkeypatch.setattr(gpu_cells, "device_info", lambda on_cpu: {"on_cpu": on_cpu, "cuda_available": True})
    monkeypatch.setattr(gpu_cells, "gpu_cell", cell_or_oom)
    monkeypatch.setattr(gpu_cells, "release_device", released.append)
    spec = {"on_cpu": False, "cells": cells, "deadline": time.time() + 60, "budget_s": 60}
    gpu_cells.gpu_matrix({**spec, "progress": str(tmp_path / "a.jsonl")}, tmp_path)
    results = [e["cell"] for e in workers.read_events(tmp_path / "a.jsonl") if e["event"] == "cell"]
    assert [("images_per_s" in c, c.get("error", "")[:30]) for c in results] == [
        (True, ""),
        (False, "RuntimeError: CUDA out of memo"),
        (True, ""),
    ]
    assert released == [False]  # the failed cell's memory is given back before the next one

    gpu_cells.gpu_matrix({**spec, "deadline": time.time() - 1, "progress": str(tmp_path / "b.jsonl")}, tmp_path)
    skipped = [e["cell"]["skipped"] for e in workers.read_events(tmp_path / "b.jsonl") if e["event"] == "cell"]
    assert len(skipped) == 3 and all(s.startswith("--budget-s 60 reached") for s in skipped)


def test_gpu_matrix_driver_restarts_after_a_lost_cell_and_renders_every_row(tmp_path: Path) -> None:
    """A worker that dies inside a cell loses that cell only: it is "failed" with the reason, a new worker runs the
    cells after it, and the compile cells get a fresh worker; the table has a row per cell."""
    gpu_cells, workers = bench_module("gpu_cells"), bench_module("workers")
    markdown_report, gpu_schedule = bench_module("markdown_report"), bench_module("gpu_schedule")
    cells = gpu_cells.plan_gpu_cells(
        ["baseline:192x256", "vgg16:192x256"],
        list(gpu_cells.GPU_VARIANTS),
        ["baseline"],
        ["baseline:192x256"],
        ["fp32"],
    )
    calls: list[list[str]] = []

    def launch(kind: str, spec: dict[str, Any], workdir: Path, timeout: float, watch: Any) -> dict[str, Any]:
        progress = Path(spec["progress"])
        calls.append([gpu_cells.cell_key(c) for c in spec["cells"]])
        workers.emit(progress, {"event": "device", "info": {"device_name": "Fake GPU", "on_cpu": False}})
        for cell in spec["cells"]:
            workers.emit(progress, {"event": "start", "key": gpu_cells.cell_key(cell), "compile": False})
            if cell["model"] == "vgg16" and cell["variant"] == "bf16":
                raise workers.WorkerError("gpu_matrix_1", "exit -11", "step 3\nSegmentation fault\n")
            fast = cell["variant"] == "bf16_cl_compile"
            workers.emit(
                progress,
                {
                    "event": "cell",
                    "cell": fake_cell(
                        gpu_cells, cell, 200.0 if fast else 100.0, 5 if fast else 10, 30.5 if fast else 0.5
                    ),
                },
            )
        return {"max_rss_mb": 1.0}

    spec = {"on_cpu": False, "deadline": time.time() + 60, "budget_s": 60, "cell_timeout_s": 9, "compile_timeout_s": 9}
    gpu = gpu_schedule.run_gpu_matrix(spec, cells, tmp_path, 60, launch=launch)
    assert len(calls) == 3  # eager + DDP, the rest after the lost cell, then the compile cell
    assert calls[1] == ["vgg16:192x256:bf16_cl:single", "baseline:192x256:fp32:ddp"]
    assert calls[2] == ["baseline:192x256:bf16_cl_compile:single"]
    assert [gpu_cells.cell_key(c) for c in gpu["cells"]] == [gpu_cells.cell_key(c) for c in cells]
    lost = next(c for c in gpu["cells"] if c["model"] == "vgg16" and c["variant"] == "bf16")
    assert lost["error"] == "worker exit -11; its last output: Segmentation fault"
    assert gpu["device_name"] == "Fake GPU"

    rows = table_rows("\n".join(markdown_report.gpu_table(gpu)))
    assert len(rows) == len(cells)
    assert rows["vgg16", "192x256", "single device", "bf16-mixed"]["note"].startswith("failed: worker exit -11")
    compiled = rows["baseline", "192x256", "single device", "bf16-mixed + channels_last + torch.compile"]
    assert compiled["vs fp32"] == "2.00x" and "compiling took ~30 s, repaid after ~6,000 steps" in compiled["note"]
    assert "1.00x the single-device row" in rows["baseline", "192x256", "DDP, 1 device", "fp32"]["note"]

    spent = {**spec, "deadline": time.time() - 1}
    calls.clear()
    gpu = gpu_schedule.run_gpu_matrix(spent, cells, tmp_path, 60, launch=launch)
    assert not calls and all(c["skipped"] == "--budget-s 60 used up" for c in gpu["cells"])


def test_data_throughput_compares_with_the_model(
    tmp_path: Path, train_report: tuple[dict[str, Any], str, Path]
) -> None:
    out = tmp_path / "data.json"
    proc = run_script(
        "data_throughput.py",
        "--configs",
        "baseline_cpu",
        "--workers",
        "0",
        "1",
        "--rounds",
        "1",
        "--warmup",
        "1",
        "--batches",
        "2",
        "--model-warmup",
        "1",
        "--model-steps",
        "1",
        "-o",
        "data.image_size=[24,32]",
        "--train-json",
        str(train_report[2]),
        "--json",
        str(out),
    )
    report = json.loads(out.read_text())
    for key in ("date_utc", "git", "versions", "cpu", "load_before", "load_after", "target_data_over_model"):
        assert key in report
    res = report["configs"]["baseline_cpu"]
    assert [r["num_workers"] for r in res["runs"]] == [0, 1]
    assert all(
        positive(r["images_per_s"], r["cpu_ms_per_image"]) and r["images"] == 2 * res["batch_size"] for r in res["runs"]
    )
    assert res["runs"][1]["cpu_seconds_workers"] > 0  # the worker process's CPU time is counted
    assert positive(res["model_only"]["images_per_s"])
    assert set(res["comparisons"]) == {"model_only", "train_lightning", "train_plain"}
    for comparison in res["comparisons"].values():
        assert positive(*comparison["data_over_model"].values(), *comparison["feed_cpu_share"].values())
    assert "| workers | data img/s |" in proc.stdout


def test_clock_counts_only_the_timed_steps() -> None:
    probes = bench_module("probes")
    clock = probes.Clock(warmup=2, steps=3)
    for size in (10, 10, 4, 5, 6):
        assert not clock.done
        clock.step_end(size)
    assert clock.done
    result = clock.result()
    assert result["images"] == 15 and result["steps"] == 3 and result["seconds"] >= 0
    with pytest.raises(ValueError, match="warmup and steps"):
        probes.Clock(warmup=0, steps=3)
    with pytest.raises(RuntimeError, match="Only 1 of"):
        unfinished = probes.Clock(warmup=1, steps=1)
        unfinished.step_end(1)
        unfinished.result()


def test_image_type_eval_reuses_cached_features_only_for_the_same_model(tmp_path: Path) -> None:
    """A cache written for one checkpoint must not feed another one's gates (re-shipping writes to the same folder)."""
    import argparse
    import types

    import numpy as np
    import pandas as pd

    from tests.test_ood import load_script

    module = load_script(BENCH / "image_type_eval.py")
    image = REPO_ROOT / "docs" / "app_screenshot.png"
    calls: list[str] = []

    def predictor(version: str, value: float) -> Any:
        def predict_paths(paths: list[str], batch_size: int, desc: str) -> Any:
            calls.append(version)
            n = len(paths)
            return types.SimpleNamespace(
                features=np.full((n, 2), value),
                probs=np.full((n, 7), 1 / 7),
                msp=np.full(n, 1 / 7),
                stage_stats=np.full((n, 4), value),
            )

        return types.SimpleNamespace(version=version, predict_paths=predict_paths)

    def fresh_sets() -> dict[str, Any]:
        return {"val": module.ImageSet("val", pd.DataFrame({"path": [str(image)]}))}

    args = argparse.Namespace(cache=tmp_path / "features.npz", batch_size=8)
    module.predict_sets(fresh_sets(), predictor("model-a", 1.0), args)
    sets = fresh_sets()
    module.predict_sets(sets, predictor("model-a", 9.0), args)
    assert calls == ["model-a"] and sets["val"].features[0, 0] == 1.0  # read from the cache
    sets = fresh_sets()
    module.predict_sets(sets, predictor("model-b", 2.0), args)
    assert calls == ["model-a", "model-b"] and sets["val"].features[0, 0] == 2.0  # computed again
