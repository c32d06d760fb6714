"""Experiment tracking and search: what Lightning's MLFlowLogger and hydra-optuna-sweeper leave out.

- :class:`MLflowRunInfo` (Lightning callback, added by ``logger=mlflow``): MLFlowLogger logs metrics and the
  LightningModule's hyper-parameters only; this adds the resolved Hydra config (as ``config/...`` params and
  artifacts) and the best checkpoint's path (tag ``best_model_path``), so a run can be traced back to its files.
- :class:`SweepGuard` (Hydra callback, added by ``+hparams_search=...``): hydra-optuna-sweeper 1.3 + optuna 2.10 crash
  the whole sweep on a NaN objective (the trial stays RUNNING), keep no traceback of a failed trial, and SQLite does
  not create the study database's folder. The guard turns a non-finite objective into a failed job (a FAIL trial),
  writes a failed job's traceback to that job's log file and creates the folder.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, cast

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

BEST_MODEL_TAG = "best_model_path"


def hydra_job_config() -> tuple[dict[str, Any] | None, Path | None]:
    """The running Hydra job's config, resolved, and the folder Hydra saved it in (``<run>/.hydra``).

    Hydra writes the composed config there before the task starts; read back inside the job, its ``${hydra:...}``
    interpolations resolve as they did for the task. Outside a Hydra job (``train(cfg)`` called directly) there is none.
    """
    if not HydraConfig.initialized():
        return None, None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is None:  # hydra.output_subdir=null: Hydra saved nothing
        return None, None
    folder = Path(hydra_cfg.runtime.output_dir, hydra_cfg.output_subdir)
    config_file = folder / "config.yaml"
    if not config_file.is_file():
        return None, None
    config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True, throw_on_missing=False)
    return config, folder  # type: ignore[return-value]


class MLflowRunInfo(Callback):
    """Logs the Hydra config at fit start and the best checkpoint's path at fit end into every MLFlowLogger run."""

    def __init__(self, log_config: bool = True) -> None:
        self.log_config = log_config

    @staticmethod
    def _mlflow_loggers(trainer: Trainer) -> list[MLFlowLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, MLFlowLogger)]

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loggers = self._mlflow_loggers(trainer)
        if not loggers or not trainer.is_global_zero:
            return
        config, hydra_folder = hydra_job_config() if self.log_config else (None, None)
        if self.log_config and config is None:
            log.warning(
                "MLflow: no Hydra config to log (train() was not started by train.py / lesionnet train, or "
                "hydra.output_subdir=null); the run has the model's hyper-parameters and metrics only."
            )
        for logger in loggers:
            client, run_id = logger.experiment, logger.run_id
            client.set_tag(run_id, "run_dir", str(Path(trainer.default_root_dir).resolve()))
            if config is not None:
                logger.log_hyperparams({"config": config})  # flattened: config/model/optimizer/lr, ...
                client.log_dict(run_id, config, "config.yaml")  # the resolved config, whole
                client.log_artifacts(run_id, str(hydra_folder), "hydra")  # as composed: config, overrides, hydra

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loggers = self._mlflow_loggers(trainer)
        if not loggers or not trainer.is_global_zero:
            return
        # the checkpoint train() validates and tests (the configs' checkpoint callbacks are ModelCheckpoints)
        checkpoint = cast("ModelCheckpoint | None", trainer.checkpoint_callback)
        best = str(Path(checkpoint.best_model_path).resolve()) if checkpoint and checkpoint.best_model_path else ""
        score = getattr(checkpoint, "best_model_score", None)  # None without a monitored checkpoint
        for logger in loggers:
            logger.experiment.set_tag(logger.run_id, BEST_MODEL_TAG, best or "none (checkpointing off)")
            if score is not None:
                logger.experiment.set_tag(logger.run_id, "best_model_score", f"{float(score):.6g}")


def _sqlite_file(storage: Any) -> Path | None:
    """The database file of a ``sqlite:///...`` storage URL, None for other storages and in-memory SQLite."""
    if not isinstance(storage, str) or not storage.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url  # installed with optuna (pip install -e ".[search]")

    database = make_url(storage).database
    return Path(database) if database and database != ":memory:" else None


class SweepGuard(HydraCallback):
    """Makes an Optuna sweep survive what would otherwise stop or lose it (see the module docstring)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        database = _sqlite_file(OmegaConf.select(config, "hydra.sweeper.storage"))
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value  # reading .return_value would raise it
            log.error("Job %s failed: the sweep records it as a failed trial.", job_return.overrides, exc_info=error)
            return
        if job_return.status != JobStatus.COMPLETED:
            return
        value = job_return.return_value
        values = value if isinstance(value, list | tuple) else [value]
        if any(isinstance(v, int | float) and not math.isfinite(v) for v in values):
            error = FloatingPointError(
                f"The objective is {value} (diverged?): recorded as a failed trial. Lower the learning rate's "
                "range or monitor a metric that stays finite (monitor=val/balanced_acc)."
            )
            job_return.status, job_return.return_value = JobStatus.FAILED, error  # the sweeper tells Optuna FAIL
            log.error("Job %s: %s", job_return.overrides, error)
