"""``lesionnet report 'runs=[<run or sweep folder>,...]' [out_dir=...] [sort_by=...]``: the results table.

Folders may also be given as bare arguments (``lesionnet report logs/train/multiruns/<sweep>``): each existing
folder among the arguments is turned into the ``runs=[...]`` override before Hydra parses the command line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lesionnet.cli import CONF_DIR
from lesionnet.results_table import write_results_table

HYDRA_VALUE_OPTIONS = frozenset(
    {
        "--cfg",
        "-c",
        "--package",
        "-p",
        "--info",
        "-i",
        "--config-path",
        "-cp",
        "--config-name",
        "-cn",
        "--config-dir",
        "-cd",
        "--experimental-rerun",
    }
)


def _quoted(path: str) -> str:
    """A Hydra override string literal: quoting keeps commas, spaces and brackets in folder names intact."""
    quote = "'" if "'" not in path else '"'
    return f"{quote}{path}{quote}"


def positional_runs(argv: Sequence[str]) -> list[str]:
    """Replace bare folder arguments with one ``runs=[...]`` override; options and overrides pass unchanged."""
    rest: list[str] = []
    folders: list[str] = []
    after_option = False
    for arg in argv:
        if not after_option and not arg.startswith("-") and "=" not in arg and Path(arg).is_dir():
            folders.append(arg)
        else:
            rest.append(arg)
        after_option = arg in HYDRA_VALUE_OPTIONS  # e.g. --config-dir DIR: DIR is not a run folder
    return [*rest, f"runs=[{','.join(_quoted(f) for f in folders)}]"] if folders else rest


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="report")
def main(cfg: DictConfig) -> None:
    runs = OmegaConf.to_container(cfg.runs) if not isinstance(cfg.runs, str) else [cfg.runs]
    if not isinstance(runs, list):
        raise ValueError(f"runs must be a folder or a list of folders, got {runs!r}.")
    write_results_table(runs, cfg.out_dir, sort_by=cfg.sort_by, sort_mode=cfg.sort_mode)


if __name__ == "__main__":
    sys.argv[1:] = positional_runs(sys.argv[1:])
    main()
