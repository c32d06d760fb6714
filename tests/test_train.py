"""train.py end to end through Hydra's compose API and the real CLI, on the synthetic dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from lesionnet.module import LesionClassifier
from lesionnet.training import instantiate_group, train
from tests.conftest import CONF, FAST, REPO_ROOT, compose_train
from tests.test_scale import SLURM_ENV


def test_fast_dev_run_writes_split_and_metrics(ham_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = compose_train([f"data.root={ham_dir}", f"paths.output_dir={out}", "trainer.fast_dev_run=true", *FAST])
    train(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"test/acc", "test/balanced_acc", "test/auroc", "test/recall_mel"} <= set(metrics["test"])
    assert sum(metrics["split_images"].values()) == 84 and min(metrics["split_images"].values()) > 0
    split = (out / "split.csv").read_text().splitlines()
    assert split[0] == "image_id,lesion_id,dx,split,schema_version" and len(split) == 85


def test_fit_tests_the_best_checkpoint_and_returns_the_monitored_metric(ham_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = compose_train([f"data.root={ham_dir}", f"paths.output_dir={out}", "trainer.max_epochs=2", *FAST])
    value = train(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    best = Path(metrics["best_checkpoint"])
    assert best.is_file() and best.parent == out / "checkpoints" and (out / "checkpoints" / "last.ckpt").is_file()
    assert value == metrics["val"]["val/balanced_acc"]
    assert (out / "csv" / "metrics.csv").is_file()

    # The checkpoint is plain data: loadable without unpickling code, and it rebuilds the same model.
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    model = LesionClassifier(**ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    assert model.hparams.data_config["input_size"] == [3, 24, 32]
    assert model.hparams.class_weights is not None  # data.imbalance=loss is the default


def test_resume_from_last_checkpoint_continues_training(ham_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(
        compose_train([f"data.root={ham_dir}", f"paths.output_dir={out}", "trainer.max_epochs=1", "test=false", *FAST])
    )
    last = out / "checkpoints" / "last.ckpt"
    resumed = tmp_path / "resumed"
    train(
        compose_train(
            [
                f"data.root={ham_dir}",
                f"paths.output_dir={resumed}",
                "trainer.max_epochs=2",
                f"ckpt_path={last}",
                "test=false",
                *FAST,
            ]
        )
    )
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 2


def test_bad_config_value_fails_with_a_clear_message(ham_dir: Path, tmp_path: Path) -> None:
    cfg = compose_train([f"data.root={ham_dir}", f"paths.output_dir={tmp_path}", "data.imbalance=oversample", *FAST])
    with pytest.raises(Exception, match=r"data\.imbalance must be one of"):
        train(cfg)


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override",
    [f"{g}={o}" for g in ("data", "model", "finetune", "trainer", "callbacks", "logger") for o in _group_options(g)]
    + [f"experiment={o}" for o in _group_options("experiment")],
)
def test_every_config_composes_and_instantiates(override: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if override == "trainer=slurm":  # SLURMEnvironment reads the job's variables when the Trainer is built
        for key, value in SLURM_ENV.items():
            monkeypatch.setenv(key, value)
    extra = ["model.distill.teachers=[teacher-run]"] if override == "experiment=cpu_lite0_distill" else []  # ??? there
    cfg = compose_train(
        [
            override,
            f"paths.output_dir={tmp_path}",
            f"paths.log_dir={tmp_path}",
            "data.num_workers=0",
            "model.pretrained=false",
            *extra,
        ]
    )
    dm = instantiate(cfg.data)
    assert dm.data_config["input_size"][0] == 3
    model = instantiate(cfg.model, _recursive_=False, class_prior=[1 / 7] * 7)  # train.py passes the real prior
    model.configure_optimizers()
    trainer_cfg = {k: v for k, v in cfg.trainer.items() if k not in ("accelerator", "devices", "precision")}
    instantiate(
        DictConfig(trainer_cfg),
        callbacks=instantiate_group(cfg.get("callbacks")),
        logger=instantiate_group(cfg.get("logger")) or False,
    )


def test_train_py_cli_runs_on_the_embedded_sample(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "train.py", "trainer.fast_dev_run=true", "data.num_workers=0", f"hydra.run.dir={tmp_path}"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embedded HAM10000 sample" in result.stdout + result.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["test"]["test/acc"] >= 0.0
