"""Scaling out and surviving faults: trainer options and launchers, sync BatchNorm, torch.compile, DDP on CPU,
resuming a killed run, SLURM's requeue signal and SIGTERM."""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.plugins import TorchSyncBatchNorm
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy
from PIL import Image
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct

from lesionnet.classes import CLASS_NAMES
from lesionnet.data.datamodule import HAM10000DataModule
from lesionnet.module import LesionClassifier, build_metrics
from lesionnet.training import TimmSyncBatchNorm, build_trainer, train
from tests.conftest import FAST, REPO_ROOT, compose_train, make_ham_dir

# The checkpoint that ckpt_path=last resumes from must be the latest state. With save_last=True Lightning 2.6 rewrites
# last.ckpt only when a top-k checkpoint is saved (i.e. it is the best, not the latest), so a second, unmonitored
# ModelCheckpoint writes last.ckpt every epoch, and on an exception (SIGTERM) too. `++` works with or without
# callbacks.last_checkpoint in lesionnet/conf/callbacks.
LAST = [
    "callbacks.model_checkpoint.save_last=false",
    "++callbacks.last_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
    "++callbacks.last_checkpoint.dirpath=${paths.output_dir}/checkpoints",
    "++callbacks.last_checkpoint.filename=last",
    "++callbacks.last_checkpoint.monitor=null",
    "++callbacks.last_checkpoint.enable_version_counter=false",
    "++callbacks.last_checkpoint.save_on_exception=true",
]
# What SLURM exports to the task of a one-task job (all that Lightning's SLURMEnvironment reads).
SLURM_ENV = {
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_JOB_NAME": "lesionnet",
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}


class SignalAt(L.Callback):
    """Sends a signal to its own training process when batch ``batch`` of epoch ``epoch`` starts.

    A fault on cue: a real process gets a real signal, at a fixed point rather than after a race with a timer.
    """

    def __init__(self, signal: str, epoch: int, batch: int = 0) -> None:
        self.signum, self.epoch, self.batch = signal_number(signal), epoch, batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.current_epoch == self.epoch and idx == self.batch:
            os.kill(os.getpid(), self.signum)


def signal_number(name: str) -> signal.Signals:
    return signal.Signals[name]


def signal_at(name: str, sig: str, epoch: int, batch: int) -> list[str]:
    key = f"+callbacks.{name}"
    return [
        f"{key}._target_=tests.test_scale.SignalAt",
        f"{key}.signal={sig}",
        f"{key}.epoch={epoch}",
        f"{key}.batch={batch}",
    ]


def make_flat_ham_dir(root: Path) -> Path:
    """The synthetic dataset with one flat colour per image (a class colour plus noise).

    The classes are learnable, so the metrics move within the few steps these tests train.
    """
    make_ham_dir(root)
    rng = np.random.default_rng(0)
    for row in pd.read_csv(root / "HAM10000_metadata.csv").itertuples():
        c = CLASS_NAMES.index(row.dx)
        colour = np.clip(np.array([c * 36, 255 - c * 36, (c * 97) % 256]) + rng.integers(-30, 31, 3), 0, 255)
        Image.new("RGB", (40, 30), tuple(int(v) for v in colour)).save(root / "images" / f"{row.image_id}.jpg")
    return root


@pytest.fixture(scope="module")
def flat_ham(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_flat_ham_dir(tmp_path_factory.mktemp("flat") / "ham")


@pytest.fixture(scope="module")
def textured_ham(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ham_dir(tmp_path_factory.mktemp("textured") / "ham")


def run_train(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """train.py in its own process: DDP re-runs it per rank, and a killed run must not take pytest with it."""
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def metrics(run: Path) -> dict[str, Any]:
    return json.loads((run / "metrics.json").read_text())


def fake_commands(folder: Path, log: Path, *names: str) -> dict[str, str]:
    """Stand-ins for SLURM's commands that record their arguments; returns the environment that puts them first."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
        (folder / name).chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


# --- configuration -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        (
            ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true"],
            lambda t: (
                isinstance(t.strategy, DDPStrategy)
                and t.num_devices == 2
                and isinstance(t.strategy._layer_sync, TimmSyncBatchNorm)
            ),
        ),
        (
            ["trainer=ddp_cpu"],
            lambda t: (
                isinstance(t.strategy, DDPStrategy)
                and t.num_devices == 2
                and t.strategy._layer_sync is None
                and t.strategy._get_process_group_backend() == "gloo"
            ),
        ),
        (["trainer=cpu", "trainer.precision=bf16-mixed"], lambda t: t.precision == "bf16-mixed"),
        (["trainer=gpu", "trainer.accelerator=cpu"], lambda t: t.precision == "bf16-mixed"),  # 16-mixed: bf16 on CPU
    ],
)
@pytest.mark.filterwarnings("ignore:.*AMP with fp16 is not supported on CPU")
def test_trainer_options_build_the_lightning_objects(overrides: list[str], check: Callable, tmp_path: Path) -> None:
    trainer = build_trainer(compose_train([*overrides, f"paths.output_dir={tmp_path}", "logger=none"]))
    assert check(trainer)


def test_slurm_trainer_takes_ranks_from_slurm_and_requeues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        **SLURM_ENV,
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "1",
    }.items():
        monkeypatch.setenv(key, value)
    cfg = compose_train(
        [
            "trainer=slurm",
            "trainer.accelerator=cpu",
            "trainer.precision=32-true",
            f"paths.output_dir={tmp_path}",
            "logger=none",
        ]
    )
    trainer = build_trainer(cfg)
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal == signal.SIGUSR1
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank) == (2, 1, 1)
    assert isinstance(trainer.strategy._layer_sync, TimmSyncBatchNorm)


def test_slurm_launcher_writes_the_batch_script_ddp_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hydra/launcher=slurm through hydra-submitit-launcher up to the sbatch script (submission itself faked)."""
    submitit = pytest.importorskip("submitit", reason="hydra-submitit-launcher not installed")
    monkeypatch.setenv("PATH", fake_commands(tmp_path / "bin", tmp_path / "calls.log", "srun", "sbatch")["PATH"])
    cfg = compose_train(
        [
            "trainer=slurm",
            "trainer.devices=4",
            "trainer.num_nodes=2",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        hydra=True,
    )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    executors: list[Any] = []
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", lambda self, fn, *args: executors.append(self) or [])
    assert launcher.launch([["model=baseline"], ["model=baseline_bn"]], initial_job_idx=0) == []
    script = executors[0]._executor._make_submission_file_text("python -u -m submitit.core._submit FOLDER", "0")
    for line in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--signal=USR1@120",
        "--requeue",
        "--partition=gpu",
        "--mem=64GB",
        "--time=720",
        "export HF_HUB_OFFLINE=1",
    ):
        assert line in script, line
    assert script.rstrip().splitlines()[-1].startswith("srun ")  # one task per GPU, started by srun


def test_local_launcher_config_imports(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed")
    cfg = compose_train(["hydra/launcher=local", f"hydra.sweep.dir={tmp_path}"], hydra=True)
    assert get_class(cfg.hydra.launcher._target_).__name__ == "LocalLauncher"
    launcher = instantiate(cfg.hydra.launcher)
    assert launcher.params["tasks_per_node"] == 1 and launcher.params["gpus_per_node"] == 1


def test_ckpt_path_last_without_a_checkpoint_is_an_error(tmp_path: Path) -> None:
    cfg = compose_train([f"paths.output_dir={tmp_path}", "ckpt_path=last", *FAST])
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last: there is no .*last\.ckpt.*hydra\.run\.dir"):
        train(cfg)


# --- sync BatchNorm and torch.compile ------------------------------------------------------------------------


def _partial_lite0() -> LesionClassifier:
    torch.manual_seed(0)
    finetune = {"policy": "partial", "unfreeze_from": "blocks.5"}
    return LesionClassifier(backbone="tf_efficientnet_lite0", finetune=finetune)


def _modules(model: torch.nn.Module, kind: type | tuple[type, ...]) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


def test_sync_batchnorm_keeps_timm_activations_and_leaves_frozen_batchnorm_alone() -> None:
    model = _partial_lite0().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    frozen = _modules(model, FrozenBatchNormAct2d)
    trainable = _modules(model, BatchNormAct2d)
    assert frozen and trainable

    # Lightning's own converter: BatchNormAct2d -> SyncBatchNorm, whose forward skips the activation.
    stock = TorchSyncBatchNorm().apply(copy.deepcopy(model)).eval()
    with torch.no_grad():
        assert not torch.allclose(stock(x), expected, atol=1e-3)

    synced = TimmSyncBatchNorm().apply(model).eval()
    assert set(_modules(synced, SyncBatchNormAct)) == set(trainable)
    assert all(synced.get_submodule(n) is m for n, m in frozen.items())  # not converted, same frozen buffers
    with torch.no_grad():
        assert torch.allclose(synced(x), expected, atol=1e-6)

    reverted = TimmSyncBatchNorm().revert(synced).eval()  # Lightning reverts after fit, before validate/test
    assert not _modules(reverted, torch.nn.SyncBatchNorm)
    assert set(_modules(reverted, BatchNormAct2d)) == set(trainable)
    assert all(reverted.get_submodule(n) is m for n, m in frozen.items())
    with torch.no_grad():
        assert torch.allclose(reverted(x), expected, atol=1e-6)


def test_compile_is_in_place_and_checkpoints_stay_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    # Dynamo's graph capture is what is tested here; inductor's C++ code generation is left to the GPU check.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch.manual_seed(0)
    compiled = LesionClassifier(compile=True).eval()
    keys = list(compiled.state_dict())
    compiled.configure_model()
    compiled.configure_model()  # Lightning calls it for every fit/validate/test: compiles once
    assert compiled.model._compiled_call_impl is not None and list(compiled.state_dict()) == keys
    eager = LesionClassifier(**{**compiled.hparams, "compile": False}).eval()
    eager.load_state_dict(compiled.state_dict())  # same parameter names: no "_orig_mod." prefix
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(compiled(x), eager(x), atol=1e-6)
    assert LesionClassifier(**compiled.hparams).model._compiled_call_impl is None  # rebuilt from hparams: eager


# --- processes -----------------------------------------------------------------------------------------------


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:No positive samples in targets")  # one rank's half lacks a class
def test_ddp_on_cpu_reduces_validation_metrics_over_both_ranks(flat_ham: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    result = run_train(
        [
            "trainer=ddp_cpu",
            "trainer.max_epochs=1",
            "test=false",
            f"data.root={flat_ham}",
            f"hydra.run.dir={run}",
            *FAST,
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reported = metrics(run)
    assert reported["config"]["trainer"]["devices"] == 2 and "train_ddp_process_1.log" in os.listdir(run)

    # The same checkpoint scored by one process over the whole validation split.
    ckpt = torch.load(reported["best_checkpoint"], map_location="cpu", weights_only=True)
    model = LesionClassifier(**ckpt["hyper_parameters"]).eval()
    model.load_state_dict(ckpt["state_dict"])
    dm = HAM10000DataModule(
        model.hparams.backbone,
        root=str(flat_ham),
        image_size=[24, 32],
        num_workers=0,
        split_file=str(run / "split.csv"),
    )
    dm.setup()
    with torch.no_grad():
        batches = [(model(x).softmax(-1), y) for x, y in dm.val_dataloader()]
    probs, targets = torch.cat([p for p, _ in batches]), torch.cat([y for _, y in batches])
    # DistributedSampler pads the split to a multiple of the world size with its first images.
    n = len(targets)
    padded = torch.cat([torch.arange(n), torch.arange((-n) % 2)])

    def score(index: torch.Tensor) -> dict[str, float]:
        return {k: float(v) for k, v in build_metrics(CLASS_NAMES, "val")(probs[index], targets[index]).items()}

    everything, rank0 = score(padded), score(padded[0::2])
    names = ("val/acc", "val/balanced_acc", "val/auroc")
    for name in names:
        assert reported["val"][name] == pytest.approx(everything[name], abs=1e-6), name
    assert any(rank0[k] != pytest.approx(everything[k], abs=1e-6) for k in names)  # the check can tell them apart


@pytest.mark.slow
def test_killed_run_resumes_from_last_to_the_uninterrupted_result(textured_ham: Path, tmp_path: Path) -> None:
    """SIGKILL mid-epoch, then ckpt_path=last in the same run folder: bit-identical to a run never interrupted.

    On textured images with every augmentation on. Deterministic because: trainer.deterministic, no loader workers
    (persistent workers would be reseeded at the resumed epoch instead of continuing), checkpoints carry the global
    RNG states (LesionClassifier.on_save_checkpoint) and albumentations is reseeded from torch's RNG per sample.
    """
    common = [
        "trainer=cpu",
        "trainer.max_epochs=3",
        "trainer.deterministic=true",
        f"data.root={textured_ham}",
        *FAST,
        *LAST,
    ]
    plain, crashed = tmp_path / "plain", tmp_path / "crashed"
    assert run_train([*common, f"hydra.run.dir={plain}"]).returncode == 0

    killed = run_train([*common, f"hydra.run.dir={crashed}", *signal_at("crash", "SIGKILL", epoch=1, batch=2)])
    assert killed.returncode == -signal.SIGKILL
    last = crashed / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0  # the end of epoch 0
    assert not (crashed / "metrics.json").exists()

    resumed = run_train([*common, f"hydra.run.dir={crashed}", "ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {last}" in resumed.stdout + resumed.stderr
    a, b = metrics(plain), metrics(crashed)
    assert (a["val"], a["test"], a["epochs_trained"]) == (b["val"], b["test"], b["epochs_trained"])
    assert Path(a["best_checkpoint"]).name == Path(b["best_checkpoint"]).name
    weights_a = torch.load(plain / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    weights_b = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.mark.slow
def test_slurm_sigusr1_saves_and_requeues_sigterm_saves_and_the_requeued_job_resumes(
    flat_ham: Path,
    tmp_path: Path,
) -> None:
    """trainer=slurm under a faked one-task SLURM job: the time-limit signal, then the SIGTERM that follows it."""
    calls = tmp_path / "calls.log"
    env = {**SLURM_ENV, **fake_commands(tmp_path / "bin", calls, "scontrol")}
    run = tmp_path / "job"
    common = [
        "trainer=slurm",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.precision=32-true",
        "trainer.max_epochs=2",
        "test=false",
        f"data.root={flat_ham}",
        f"hydra.run.dir={run}",
        *FAST,
        *LAST,
    ]
    first = run_train(
        [*common, *signal_at("usr1", "SIGUSR1", epoch=0, batch=2), *signal_at("term", "SIGTERM", epoch=0, batch=3)], env
    )
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-3000:]  # Lightning ends a SIGTERMed fit with SystemExit(None)
    assert calls.read_text().split() == ["scontrol", "requeue", "4242"]
    assert (run / "hpc_ckpt_1.ckpt").is_file()  # saved on SIGUSR1 by SLURMEnvironment's handler
    assert "SIGTERMException was raised" in log and (run / "checkpoints" / "last.ckpt").is_file()  # on SIGTERM
    assert not (run / "metrics.json").exists()
    hpc = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert (hpc["epoch"], hpc["global_step"]) == (0, 2)

    requeued = run_train(common, env)  # the same command in the same folder, as SLURM reruns it
    log = requeued.stdout + requeued.stderr
    assert requeued.returncode == 0, log[-3000:]
    assert f"Restoring states from the checkpoint path at {run / 'hpc_ckpt_1.ckpt'}" in log
    assert metrics(run)["epochs_trained"] == 2
