"""``lesionnet <command> [overrides]``: one installed command for every entry point of the project.

Each command runs its module as ``__main__`` (as ``python -m`` would), so Hydra sees only the overrides and
Lightning's DDP launcher, which re-runs ``python -m <module> <argv>`` per rank, starts the same command again.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")  # Hydra's config root (an editable install keeps it)

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lesionnet.cli.train", "train a model                   (conf/train.yaml; same as python train.py)"),
    "evaluate": ("lesionnet.cli.evaluate",
                 "score checkpoints and ensembles (conf/eval.yaml; same as python evaluate.py)"),
    "serve": ("lesionnet.app", "start the web app and REST API  (conf/serve.yaml)"),
    "export": ("lesionnet.export", "export ONNX / TorchScript       (conf/export.yaml)"),
    "eda": ("lesionnet.eda", "exploratory data analysis       (conf/eda.yaml)"),
    "report": ("lesionnet.report", "results table of training runs"),
    "download": ("lesionnet.data.download", "download HAM10000 (Dataverse or ISIC) with checksums"),
}


def usage() -> str:
    lines = ["usage: lesionnet <command> [hydra overrides | --help]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Example: lesionnet train model=densenet201 finetune=all; lesionnet serve ckpt=logs/train/runs/<run>"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"lesionnet: unknown command '{command}'.\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module = COMMANDS[command][0]
    sys.argv = [f"lesionnet {command}", *rest]  # run_module replaces argv[0] with the module's file
    runpy.run_module(module, run_name="__main__", alter_sys=True)
