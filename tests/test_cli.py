"""The installed ``lesionnet`` command: every entry point behind one name, usable from any folder."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import get_class

import lesionnet
from lesionnet.cli import COMMANDS, CONF_DIR, main
from tests.conftest import make_ham_dir

PACKAGE = Path(lesionnet.__file__).parent
CONFIGS = {
    "train": "train",
    "evaluate": "eval",
    "serve": "serve",
    "predict": "serve",
    "export": "export",
    "eda": "eda",
    "report": "report",
    "download": "download",
    "oof": "oof",
}  # command -> its entry config in lesionnet/conf

LESIONNET = Path(sys.executable).parent / "lesionnet"  # the console script of `pip install -e .`
FAST = [
    "data.image_size=[24,32]",
    "data.num_workers=0",
    "data.batch_size=8",
    "logger=csv",
    "data.split_fractions={train:0.6,val:0.2,test:0.2}",
]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LESIONNET), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_usage_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    main([])
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS)


def test_unknown_command_exits_2_with_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["trian"])
    assert exit_.value.code == 2 and "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_runs_a_module_with_a_main(name: str) -> None:
    module = COMMANDS[name][0]
    spec = importlib.util.find_spec(module)
    assert spec is not None, module
    path = Path(
        spec.origin
        if not spec.submodule_search_locations
        else next(iter(spec.submodule_search_locations)) + "/__main__.py"
    )
    assert 'if __name__ == "__main__":' in path.read_text(), path


def test_only_the_cli_package_holds_hydra_apps() -> None:
    """Library modules stay importable and callable without Hydra taking over argv, logging and the run folder."""
    apps = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "hydra.main" in p.read_text())
    assert apps and all(p.startswith("cli/") for p in apps), apps
    assert {f"cli/{Path(module.replace('.', '/')).name}.py" for module, _ in COMMANDS.values()} == set(apps)


def test_every_command_is_a_cli_module_with_its_config_in_the_package() -> None:
    assert CONF_DIR == "pkg://lesionnet.conf" and set(CONFIGS) == set(COMMANDS)
    for name, (module, _) in COMMANDS.items():
        assert module == f"lesionnet.cli.{name}", module
        assert f'config_name="{CONFIGS[name]}"' in (PACKAGE / "cli" / f"{name}.py").read_text(), name
        assert (PACKAGE / "conf" / f"{CONFIGS[name]}.yaml").is_file(), name


def test_package_configs_compose_with_experiments_and_launchers() -> None:
    """pkg://lesionnet.conf: entry configs, a ``# @package _global_`` experiment and the package's launcher group."""
    required = {"serve": ["ckpt=x"], "export": ["ckpt=x"], "report": ["runs=[x]"], "download": ["dest=x"]}
    with initialize_config_module(config_module="lesionnet.conf", version_base="1.3"):
        for config in CONFIGS.values():
            assert compose(config, overrides=required.get(config, [])).task_name, config
        cfg = compose("train", overrides=["experiment=cpu_lite0_all", "hydra/launcher=local"], return_hydra_config=True)
    assert cfg.task_name == "cpu_lite0_all" and cfg.model.backbone.startswith("tf_efficientnet_lite0")
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed")
    assert get_class(cfg.hydra.launcher._target_).__name__ == "LocalLauncher"


def test_the_commands_have_one_way_in() -> None:
    """``lesionnet serve`` / ``eda`` / ``export`` (or ``python -m lesionnet.cli.<command>``): the old ``python -m
    lesionnet.app`` / ``lesionnet.eda`` / ``lesionnet.export`` shims imported the CLI from below it and are gone."""
    assert not (PACKAGE / "app" / "__main__.py").exists() and not (PACKAGE / "eda" / "__main__.py").exists()
    assert "__main__" not in (PACKAGE / "export.py").read_text()
    assert {"serve", "eda", "export"} <= set(COMMANDS)


def test_serve_composes_its_config_from_any_folder(tmp_path: Path) -> None:
    result = run_cli(["serve", "--cfg", "job", "ckpt=some/run", "port=9000"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ckpt: some/run" in result.stdout and "port: 9000" in result.stdout


def test_train_from_another_folder_writes_its_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = run_cli(["train", "trainer.fast_dev_run=true", f"hydra.run.dir={run}", *FAST], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "train.log").is_file() and json.loads((run / "metrics.json").read_text())["test"]


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_relaunches_the_same_command_for_the_second_rank(tmp_path: Path) -> None:
    """Lightning starts rank 1 as ``python -m <__main__'s module> <argv>``: that must be `lesionnet train` again."""
    root, run = make_ham_dir(tmp_path / "ham"), tmp_path / "ddp"
    result = run_cli(
        [
            "train",
            "trainer=ddp_cpu",
            "trainer.max_epochs=1",
            "test=false",
            f"data.root={root}",
            f"hydra.run.dir={run}",
            *FAST,
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "train_ddp_process_1.log").is_file() and (run / "metrics.json").is_file()
