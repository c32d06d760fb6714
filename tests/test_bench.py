"""Smoke tests of the throughput benchmarks (bench/train_throughput.py, bench/data_throughput.py).

Tiny settings on the embedded sample: they check that every arm runs and that the JSON holds positive numbers
under the expected keys, never the timings themselves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
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
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_gpu_matrix_code_path_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = run_script(
        "train_throughput.py",
        "--skip-cpu",
        "--gpu-matrix-on-cpu",
        "--gpu-models",
        "densenet201:32",
        "inception_v3:75",
        "--gpu-variants",
        "fp32",
        "bf16_cl",
        "bf16_cl_compile",
        "--gpu-batch",
        "2",
        "--gpu-warmup",
        "1",
        "--gpu-steps",
        "1",
        "--no-loggers",
        "--json",
        str(out),
    )
    gpu = json.loads(out.read_text())["gpu"]
    assert gpu["on_cpu"] is True and gpu["synthetic_data"] is True
    cells = {(c["model"], c["variant"]): c for c in gpu["cells"]}
    assert len(cells) == 6
    for model in ("densenet201", "inception_v3"):
        for variant, precision in (("fp32", "32-true"), ("bf16_cl", "bf16-mixed")):
            cell = cells[model, variant]
            assert "error" not in cell, cell
            assert cell["precision"] == precision and positive(cell["images_per_s"])
            assert cell["peak_gpu_memory_mb"] is None  # no CUDA: no GPU memory figure
        assert cells[model, "bf16_cl"]["channels_last"] is True
        assert "torch.compile" in cells[model, "bf16_cl_compile"]["skipped"]
    assert "GPU matrix" in proc.stdout


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
    tt = load_bench_module()
    clock = tt.Clock(warmup=2, steps=3)
    for size in (10, 10, 4, 5, 6):
        assert not clock.done
        clock.step_end(size)
    assert clock.done
    result = clock.result()
    assert result["images"] == 15 and result["steps"] == 3 and result["seconds"] >= 0
    with pytest.raises(ValueError, match="warmup and steps"):
        tt.Clock(warmup=0, steps=3)
    with pytest.raises(RuntimeError, match="Only 1 of"):
        unfinished = tt.Clock(warmup=1, steps=1)
        unfinished.step_end(1)
        unfinished.result()
