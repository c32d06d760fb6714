"""Every experiment (the seed table rows and the CPU Lite recipes) runs end to end, and the sweep report works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lesionnet.results_table import collect, write_results_table
from lesionnet.training import train
from tests.conftest import REPO_ROOT
from tests.test_train import CONF, compose_train

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# Smallest input each architecture takes (Inception stems need >= 75 px).
MIN_SIZE = {"inception_v3": 75, "inception_resnet_v2": 75}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_fast_dev_run(experiment: str, ham_dir: Path, tmp_path: Path) -> None:
    size = next((s for k, s in MIN_SIZE.items() if k in experiment), 32)
    cfg = compose_train(
        [
            f"experiment={experiment}",
            f"data.root={ham_dir}",
            f"paths.output_dir={tmp_path}",
            "model.pretrained=false",
            "trainer.fast_dev_run=true",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
            f"data.image_size={size}",
            "data.num_workers=0",
            "data.batch_size=4",
            "data.eval_batch_size=4",
            "data.split_fractions={train:0.6,val:0.2,test:0.2}",
            "logger=csv",
        ]
    )
    if experiment == "cpu_lite0_distill":  # its teachers are the user's runs: without them it stops and says so
        with pytest.raises(Exception, match="model.distill needs teachers"):
            train(cfg)
        return  # distillation itself: tests/test_distill.py
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"]["finetune"] == cfg.model.finetune.policy
    assert 0 < metrics["model"]["params_trainable"] <= metrics["model"]["params_total"]
    if cfg.model.finetune.policy != "all":
        assert metrics["model"]["params_trainable"] < metrics["model"]["params_total"]
    assert "test/balanced_acc" in metrics["test"]


def test_failed_run_does_not_stop_the_sweep_and_report_collects_the_rest(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "data.imbalance=bogus,none",
            "trainer.fast_dev_run=true",
            "data.num_workers=0",
            "logger=csv",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0  # the failure is reported ...
    assert "data.imbalance must be one of" in result.stderr
    assert (sweep / "1" / "metrics.json").is_file()  # ... after the other job ran
    table = collect(sweep)
    assert len(table) == 1 and table.loc[0, "backbone"] == "lesionnet_baseline"
    write_results_table([sweep])
    markdown = (sweep / "results.md").read_text()
    assert "test balanced acc" in markdown and "lesionnet_baseline" in markdown
    assert (sweep / "results.csv").read_text().startswith("run,backbone,finetune,val_acc,test_acc")


def test_report_without_runs_says_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No metrics.json under"):
        collect(tmp_path)


def test_the_default_cpu_recipe_is_issue_21s_winner_and_the_shipped_models_recipe() -> None:
    """``experiment=cpu_lite0`` names the default CPU recipe in one place: colour constancy and acquisition
    augmentation (issue 21's choice, docs/RESULTS.md), the data config the shipped model was trained with."""
    from lesionnet.app.shipped import SHIPPED_MODEL
    from lesionnet.data.run_folder import RunFolder

    default = compose_train(["experiment=cpu_lite0"])
    winner = compose_train(["experiment=cpu_lite0_cc_acq"])
    assert default.data == winner.data and default.model == winner.model and default.trainer == winner.trainer
    assert default.data.colour_constancy.method == "shades_of_gray" and default.data.augment.acquisition.jpeg.p > 0
    shipped = RunFolder(SHIPPED_MODEL).metrics().config
    assert shipped["task_name"] == "cpu_lite0_cc_acq"
    assert shipped["data"]["colour_constancy"] == dict(default.data.colour_constancy)
    assert shipped["data"]["augment"]["acquisition"] == OmegaConf.to_container(default.data.augment.acquisition)
