"""The results table: rows ranked by the validation metric the runs were selected on, never by a test metric."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lesionnet.cli.report import positional_runs
from lesionnet.contract.files import write_json
from lesionnet.contract.run import RunMetrics
from lesionnet.results_table import collect, write_results_table

LESIONNET = Path(sys.executable).parent / "lesionnet"


def write_run(
    folder: Path, val: dict[str, float], test: dict[str, float], monitor: str = "val/balanced_acc", mode: str = "max"
) -> Path:
    """A metrics.json as train.py writes it (through the contract's writer)."""
    folder.mkdir(parents=True)
    metrics = RunMetrics(
        backbone=f"net_{folder.name}",
        monitor=monitor,
        model={"finetune": "all", "depth": 5},
        best_checkpoint="",
        epochs_trained=3,
        fit_seconds=50.0,
        wall_seconds=60.0,
        data_root="data",
        data_config={},
        split_images={},
        val=val,
        test=test,
        config={"monitor": monitor, "monitor_mode": mode},
    )
    write_json(metrics, folder / "metrics.json")
    return folder


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Run a is better on validation, run b on test: the two orders differ."""
    write_run(
        tmp_path / "sweep" / "0",
        {"val/acc": 0.7, "val/balanced_acc": 0.80},
        {"test/acc": 0.6, "test/balanced_acc": 0.50},
    )
    write_run(
        tmp_path / "sweep" / "1",
        {"val/acc": 0.9, "val/balanced_acc": 0.60},
        {"test/acc": 0.9, "test/balanced_acc": 0.90},
    )
    return tmp_path / "sweep"


def test_rows_are_ranked_by_the_monitored_validation_metric_not_by_test(sweep: Path) -> None:
    table = collect(sweep)
    assert list(table["backbone"]) == ["net_0", "net_1"]  # by val/balanced_acc; test/balanced_acc would swap them
    assert list(table["val_monitor"]) == [0.80, 0.60] and set(table["monitor"]) == {"val/balanced_acc"}


def test_a_minimised_monitor_ranks_the_lowest_first(tmp_path: Path) -> None:
    write_run(tmp_path / "a", {"val/loss": 0.9}, {"test/balanced_acc": 0.9}, monitor="val/loss", mode="min")
    write_run(tmp_path / "b", {"val/loss": 0.3}, {"test/balanced_acc": 0.1}, monitor="val/loss", mode="min")
    assert list(collect(tmp_path)["backbone"]) == ["net_b", "net_a"]


def test_sort_by_ranks_every_run_on_one_metric(sweep: Path) -> None:
    assert list(collect(sweep, sort_by="val/acc")["backbone"]) == ["net_1", "net_0"]
    assert list(collect(sweep, sort_by="val/acc", sort_mode="min")["backbone"]) == ["net_0", "net_1"]


def test_runs_selected_on_different_metrics_are_refused_with_the_fix(tmp_path: Path) -> None:
    write_run(tmp_path / "a", {"val/balanced_acc": 0.5}, {})
    write_run(tmp_path / "b", {"val/loss": 0.3}, {}, monitor="val/loss", mode="min")
    with pytest.raises(ValueError, match="different validation metrics.*sort_by=val/balanced_acc"):
        collect(tmp_path)
    assert list(collect(tmp_path, sort_by="val/balanced_acc")["backbone"]) == ["net_a", "net_b"]  # b lacks it: last


def test_write_results_table_writes_markdown_and_csv_in_the_ranked_order(sweep: Path, tmp_path: Path) -> None:
    write_results_table([sweep], tmp_path / "out")
    csv = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(csv["backbone"]) == ["net_0", "net_1"]
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert markdown.index("net_0") < markdown.index("net_1") and "val (sort key)" in markdown


def test_bare_folders_become_the_runs_override(sweep: Path, tmp_path: Path) -> None:
    argv = ["--config-dir", str(tmp_path), str(sweep), "out_dir=x", str(sweep / "0")]
    assert positional_runs(argv) == ["--config-dir", str(tmp_path), "out_dir=x", f"runs=['{sweep}','{sweep / '0'}']"]
    assert positional_runs(["runs=[a]", "--cfg", "job"]) == ["runs=[a]", "--cfg", "job"]


def test_lesionnet_report_is_a_hydra_app_with_positional_folders(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "table"
    result = subprocess.run(
        [str(LESIONNET), "report", str(sweep), f"out_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(pd.read_csv(out / "results.csv")["backbone"]) == ["net_0", "net_1"]
    assert (tmp_path / "hydra" / ".hydra" / "config.yaml").is_file()  # composed by Hydra from report.yaml
