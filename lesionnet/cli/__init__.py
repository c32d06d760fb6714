"""``lesionnet <command> [overrides]``: one installed command for every entry point of the project.

Each command runs its module as ``__main__`` (as ``python -m`` would), so Hydra sees only the overrides and
Lightning's DDP launcher, which re-runs ``python -m <module> <argv>`` per rank, starts the same command again.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Sequence

CONF_DIR = "pkg://lesionnet.conf"  # Hydra's config root: package data, so an installed wheel finds it too

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lesionnet.cli.train", "train a model                   (train.yaml; same as python train.py)"),
    "evaluate": ("lesionnet.cli.evaluate", "score checkpoints and ensembles (eval.yaml; same as python evaluate.py)"),
    "serve": ("lesionnet.cli.serve", "start the web app and REST API  (serve.yaml)"),
    "predict": ("lesionnet.cli.predict", "the app's answer for photos     (serve.yaml; PHOTO... [overrides])"),
    "export": ("lesionnet.cli.export", "export ONNX / TorchScript       (export.yaml)"),
    "eda": ("lesionnet.cli.eda", "exploratory data analysis       (eda.yaml)"),
    "report": ("lesionnet.cli.report", "results table of training runs  (report.yaml)"),
    "oof": ("lesionnet.cli.oof", "out-of-fold CV figures and fits  (oof.yaml)"),
    "download": ("lesionnet.cli.download", "download HAM10000, verified    (download.yaml)"),
}


def usage() -> str:
    lines = ["usage: lesionnet <command> [hydra overrides | --help]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Configs: lesionnet/conf/<name>.yaml in the package (pkg://lesionnet.conf); --help shows the groups."]
    lines += ["Example: lesionnet train model=densenet201 finetune=all; lesionnet serve ckpt=logs/train/runs/<run>"]
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
