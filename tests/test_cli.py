"""The installed ``lesionnet`` command: every entry point behind one name, usable from any folder."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lesionnet.cli import COMMANDS, main
from tests.conftest import make_ham_dir

LESIONNET = Path(sys.executable).parent / "lesionnet"  # the console script of `pip install -e .`
FAST = ["data.image_size=[24,32]", "data.num_workers=0", "data.batch_size=8", "logger=csv",
        "data.split_fractions={train:0.6,val:0.2,test:0.2}"]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LESIONNET), *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


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
    path = Path(spec.origin if not spec.submodule_search_locations else
                next(iter(spec.submodule_search_locations)) + "/__main__.py")
    assert 'if __name__ == "__main__":' in path.read_text(), path


def test_serve_composes_its_config_from_any_folder(tmp_path: Path) -> None:
    result = run_cli(["serve", "--cfg", "job", "ckpt=some/run", "port=9000"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ckpt: some/run" in result.stdout and "port: 9000" in result.stdout


def test_train_from_another_folder_writes_its_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = run_cli(["train", "trainer.fast_dev_run=true", f"hydra.run.dir={run}", *FAST], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "train.log").is_file() and json.loads((run / "metrics.json").read_text())["test"]


def test_ddp_relaunches_the_same_command_for_the_second_rank(tmp_path: Path) -> None:
    """Lightning starts rank 1 as ``python -m <__main__'s module> <argv>``: that must be `lesionnet train` again."""
    root, run = make_ham_dir(tmp_path / "ham"), tmp_path / "ddp"
    result = run_cli(["train", "trainer=ddp_cpu", "trainer.max_epochs=1", "test=false", f"data.root={root}",
                      f"hydra.run.dir={run}", *FAST], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "train_ddp_process_1.log").is_file() and (run / "metrics.json").is_file()
