"""``logger=mlflow``: a training run becomes an MLflow run (local SQLite store under paths.log_dir) carrying the
resolved config, the metrics and the best checkpoint's path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import FAST, REPO_ROOT, compose_train, make_ham_dir

mlflow = pytest.importorskip("mlflow", reason='needs pip install -e ".[mlflow]"')


def test_mlflow_logger_config_defaults_to_a_sqlite_store_under_the_log_dir() -> None:
    cfg = compose_train(["logger=mlflow", "paths.log_dir=/data/logs", "paths.output_dir=/data/run"])
    assert cfg.logger.mlflow.tracking_uri == "sqlite:////data/logs/mlflow/mlflow.db"
    assert cfg.logger.mlflow.artifact_location == "/data/logs/mlflow/artifacts"
    assert cfg.callbacks.mlflow_run_info._target_ == "lesionnet.tracking.MLflowRunInfo"
    assert "model_checkpoint" in cfg.callbacks  # the callbacks group is kept, only extended
    remote = compose_train(["logger=mlflow", "logger.mlflow.tracking_uri=http://tracking:5000"])
    assert remote.logger.mlflow.tracking_uri == "http://tracking:5000"


@pytest.mark.slow
def test_training_run_is_an_mlflow_run_with_config_metrics_and_best_checkpoint(tmp_path: Path) -> None:
    logs, run_dir = tmp_path / "logs", tmp_path / "run"
    data_root = make_ham_dir(tmp_path / "ham")
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            *[o for o in FAST if not o.startswith("logger=")],
            "logger=mlflow",
            f"data.root={data_root}",
            f"paths.log_dir={logs}",
            f"hydra.run.dir={run_dir}",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=2",  # fast_dev_run would switch the loggers off
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())

    client = mlflow.MlflowClient(f"sqlite:///{logs / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("train")  # experiment_name = task_name
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["config/model/backbone"] == "lesionnet_baseline"  # the resolved Hydra config, flattened
    assert params["config/data/root"] == str(data_root) and params["config/trainer/max_epochs"] == "1"
    assert params["config/monitor"] == "val/balanced_acc"
    assert run.data.metrics["val/balanced_acc"] >= 0.0 and "test/balanced_acc" in run.data.metrics
    best = Path(tags["best_model_path"])
    assert best == Path(metrics["best_checkpoint"]).resolve() and best.is_file()
    assert Path(tags["run_dir"]) == run_dir.resolve() and "best_model_score" in tags

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "hydra"} <= artifacts
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text())
    assert config["paths"]["output_dir"] == str(run_dir)  # resolved: no ${hydra:...} left
    assert str(logs / "mlflow" / "artifacts") in experiment.artifact_location
