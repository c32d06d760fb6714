"""Find LesionNet checkpoints and load them without executing pickled code.

A checkpoint is read with ``torch.load(weights_only=True)``: tensors and plain data only. Everything
needed to rebuild the model and its preprocessing is in ``hyper_parameters`` (plain data by design).
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lesionnet.module import LesionClassifier

REQUIRED_HPARAMS: tuple[str, ...] = ("backbone", "class_names", "data_config")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the fix."""


@dataclass
class Member:
    """One loaded model of an evaluation, with where it came from."""

    name: str
    path: Path
    model: LesionClassifier
    run_dir: Path | None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return list(self.model.hparams.class_names)

    @property
    def data_config(self) -> dict[str, Any]:
        return dict(self.model.hparams.data_config)


def _best_in_run(run_dir: Path) -> Path:
    """The best checkpoint of a train.py run folder (from its metrics.json, else the only non-last one)."""
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        best = json.loads(metrics.read_text()).get("best_checkpoint")
        if best and (run_dir / "checkpoints" / Path(best).name).is_file():
            return run_dir / "checkpoints" / Path(best).name
    candidates = [p for p in sorted((run_dir / "checkpoints").glob("*.ckpt")) if p.name != "last.ckpt"]
    if len(candidates) != 1:
        raise CheckpointError(
            f"Cannot tell the best checkpoint of {run_dir}: {len(candidates)} candidates "
            f"({[p.name for p in candidates]}). Give the checkpoint path itself (ckpt=...)."
        )
    return candidates[0]


def resolve_checkpoints(specs: str | list[str]) -> list[Path]:
    """Checkpoint paths from paths, globs, train.py run folders or sweep folders (every run inside)."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise CheckpointError("No checkpoint given: pass ckpt=path/to/model.ckpt (or a glob, run or sweep folder).")
    found: list[Path] = []
    for spec in specs:
        matches = [Path(p) for p in sorted(glob.glob(str(Path(spec).expanduser())))] or [Path(spec).expanduser()]
        for path in matches:
            if path.is_file():
                found.append(path)
            elif (path / "checkpoints").is_dir():
                found.append(_best_in_run(path))
            elif path.is_dir() and (runs := sorted(p.parent for p in path.glob("*/checkpoints"))):
                found.extend(_best_in_run(r) for r in runs)
            else:
                raise CheckpointError(
                    f"Checkpoint not found: {spec}. Give a .ckpt file, a glob, a train.py run folder "
                    "(with checkpoints/) or a multirun folder."
                )
    return list(dict.fromkeys(found))


def run_dir_of(path: Path) -> Path | None:
    """The train.py run folder a checkpoint belongs to (``<run>/checkpoints/x.ckpt``), if it has a split.csv."""
    run = path.parent.parent
    return run if path.parent.name == "checkpoints" and (run / "split.csv").is_file() else None


def load_member(path: Path, name: str | None = None, device: str | torch.device = "cpu") -> Member:
    """Rebuild a LesionClassifier from a checkpoint (weights only; no pretrained download)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"Checkpoint not found: {path}.") from err
    except Exception as err:
        raise CheckpointError(
            f"{path} is not a loadable LesionNet checkpoint ({type(err).__name__}: {str(err)[:200]}). "
            "Only checkpoints written by train.py can be evaluated; untrusted pickles are refused."
        ) from err
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hparams or any(k not in hparams for k in REQUIRED_HPARAMS) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} is not a LesionNet checkpoint (no hyper_parameters with {list(REQUIRED_HPARAMS)}). "
            "Give a checkpoint written by train.py."
        )
    model = LesionClassifier(**{**hparams, "pretrained": False, "pretrained_file": None})
    model.load_state_dict(ckpt["state_dict"])
    model.eval().to(device)
    run = run_dir_of(path)
    label = name or re.sub(r"[^A-Za-z0-9._-]+", "-", f"{hparams['backbone']}-{run.name if run else path.stem}")
    return Member(name=label, path=path, model=model, run_dir=run, info={"epoch": ckpt.get("epoch")})
