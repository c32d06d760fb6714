"""``hparams_search=baseline_optuna``: a failed trial does not stop the study, the study persists in SQLite and a
second invocation (e.g. after a killed sweep) continues it; lesionnet.tracking.SweepGuard's pieces on their own."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from lesionnet.tracking import SweepGuard
from tests.conftest import FAST, REPO_ROOT, compose_train, make_ham_dir

STUDY = "test_study"
pytestmark = [  # optuna 2.10 marks enqueue_trial experimental and uses SQLAlchemy APIs that 1.4 flags for 2.0
    pytest.mark.filterwarnings("ignore:.*is experimental.*"),
    pytest.mark.filterwarnings("ignore:.*Deprecated API features detected.*"),
]


def _sweep(*overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "train.py", *overrides],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_search_config_composes_with_a_persistent_study_that_failures_do_not_stop() -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason='needs pip install -e ".[search]"')
    cfg = compose_train(["hparams_search=baseline_optuna", "paths.log_dir=/data/logs"], hydra=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert cfg.monitor == "val/balanced_acc" and cfg.monitor_mode == "max" and cfg.test is False
    assert sweeper.storage == "sqlite:////data/logs/optuna/baseline_optuna_train.db"  # study per task_name
    assert sweeper.max_failure_rate == 1.0 and sweeper.sampler.seed is None
    assert set(sweeper.params) == {
        "model.optimizer.lr",
        "model.optimizer.weight_decay",
        "model.model_kwargs.drop_rate",
        "model.label_smoothing",
    }
    for key in sweeper.params:  # the searched keys exist in the model config
        assert OmegaConf.select(cfg, key) is not None, key
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"


@pytest.mark.slow
def test_failed_trial_does_not_stop_the_study_and_a_second_invocation_continues_it(tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna", reason='needs pip install -e ".[search]"')
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason='needs pip install -e ".[search]"')
    logs = tmp_path / "logs"
    database = logs / "optuna" / f"{STUDY}.db"  # where the config puts the study: ${paths.log_dir}/optuna/<name>.db
    storage = f"sqlite:///{database}"
    database.parent.mkdir(parents=True)
    study = optuna.create_study(study_name=STUDY, storage=storage, direction="maximize")
    study.enqueue_trial({"data.imbalance": "bogus"})  # trial 0 fails (an invalid value) ...
    study.enqueue_trial({"data.imbalance": "none"})  # ... trial 1 must still run
    common = [
        "hparams_search=baseline_optuna",
        f"hydra.sweeper.study_name={STUDY}",
        f"paths.log_dir={logs}",
        f"data.root={make_ham_dir(tmp_path / 'ham')}",
        "trainer.fast_dev_run=true",
        *FAST,
    ]

    first = _sweep(
        "-m",
        *common,
        "hydra.sweeper.n_trials=2",
        "data.imbalance=choice(bogus,none)",
        f"hydra.sweep.dir={tmp_path / 's1'}",
    )
    assert first.returncode == 0, first.stderr[-3000:]
    trials = optuna.load_study(study_name=STUDY, storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[0].params["data.imbalance"] == "bogus" and trials[1].params["data.imbalance"] == "none"
    assert {"model.optimizer.lr", "model.label_smoothing"} <= set(trials[1].params)  # the config's search space
    assert math.isfinite(trials[1].value)
    failed_log = (tmp_path / "s1" / "0" / "train.log").read_text()
    assert "Traceback" in failed_log and "data.imbalance must be one of" in failed_log  # SweepGuard kept it

    optuna.load_study(study_name=STUDY, storage=storage).ask()  # a trial left RUNNING, as a killed sweep leaves it
    second = _sweep(
        *common, "hydra.sweeper.n_trials=1", "data.imbalance=none", f"hydra.sweep.dir={tmp_path / 's2'}"
    )  # no -m
    assert second.returncode == 0, second.stderr[-3000:]
    trials = optuna.load_study(study_name=STUDY, storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "RUNNING", "COMPLETE"]
    assert trials[3].user_attrs["data.imbalance"] == "none"  # a fixed value, recorded with the trial


def test_sweep_guard_turns_a_nan_objective_into_a_failed_trial() -> None:
    job = JobReturn(overrides=["model.optimizer.lr=10"], status=JobStatus.COMPLETED, _return_value=float("nan"))
    SweepGuard().on_job_end(OmegaConf.create(), job)
    assert job.status == JobStatus.FAILED  # hydra-optuna-sweeper then tells Optuna FAIL (a NaN value crashes it)
    with pytest.raises(FloatingPointError, match="objective is nan"):
        _ = job.return_value
    finite = JobReturn(status=JobStatus.COMPLETED, _return_value=0.5)
    SweepGuard().on_job_end(OmegaConf.create(), finite)
    assert finite.status == JobStatus.COMPLETED and finite.return_value == 0.5


def test_sweep_guard_logs_the_traceback_of_a_failed_job(caplog: pytest.LogCaptureFixture) -> None:
    try:
        raise ValueError("data.imbalance must be one of none, loss, sampler")
    except ValueError as error:
        job = JobReturn(overrides=["data.imbalance=bogus"], status=JobStatus.FAILED, _return_value=error)
    with caplog.at_level(logging.ERROR, logger="lesionnet.tracking"):
        SweepGuard().on_job_end(OmegaConf.create(), job)
    assert "data.imbalance=bogus" in caplog.text and "Traceback" in caplog.text and "must be one of" in caplog.text
    assert job.status == JobStatus.FAILED


def test_sweep_guard_creates_the_sqlite_study_folder(tmp_path: Path) -> None:
    pytest.importorskip("sqlalchemy", reason='needs pip install -e ".[search]"')
    database = tmp_path / "logs" / "optuna" / "study.db"
    SweepGuard().on_multirun_start(OmegaConf.create({"hydra": {"sweeper": {"storage": f"sqlite:///{database}"}}}))
    assert database.parent.is_dir() and not database.exists()  # the folder only: SQLite creates the file
    SweepGuard().on_multirun_start(OmegaConf.create({"hydra": {"sweeper": {"storage": None}}}))  # in memory: nothing
