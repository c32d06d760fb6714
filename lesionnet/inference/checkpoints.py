"""Find LesionNet checkpoints and load them without executing pickled code: the only ``torch.load`` of a checkpoint.

A checkpoint is read with ``torch.load(weights_only=True)``: tensors and plain data only. Everything needed to
rebuild the model and its preprocessing is in ``hyper_parameters`` (plain data by design); the images that trained
and validated it are in its provenance record. A model's identity is the sha256 of its file, not a folder name.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from lesionnet.contract.provenance import Provenance, file_sha256
from lesionnet.data.run_folder import RunFolder
from lesionnet.module import LesionClassifier

REQUIRED_HPARAMS: tuple[str, ...] = ("backbone", "class_names", "data_config")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the fix."""


@dataclass
class Member:
    """One loaded model, with where it came from and what it was trained on."""

    name: str
    path: Path
    model: LesionClassifier
    sha256: str
    provenance: Provenance | None
    run: RunFolder | None
    epoch: int | None = None

    @property
    def run_dir(self) -> Path | None:
        return self.run.path if self.run is not None else None

    @property
    def class_names(self) -> list[str]:
        return list(self.model.hparams.class_names)

    @property
    def data_config(self) -> dict[str, Any]:
        return dict(self.model.hparams.data_config)

    def describe(self) -> dict[str, Any]:
        """Identity for files that refer to this model (scores.json, the app's model card)."""
        return {"name": self.name, "file": self.path.name, "sha256": self.sha256}


def checkpoint_specs(value: str | Sequence[str] | ListConfig | None) -> list[str]:
    """``ckpt=`` as given on the command line or in a config: one spec or a list of them."""
    if value is None:
        return []
    plain: Any = OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig | DictConfig) else value
    return [str(plain)] if isinstance(plain, str | Path) else [str(v) for v in plain]


def resolve_checkpoints(specs: str | Sequence[str] | ListConfig) -> list[Path]:
    """Checkpoint paths from paths, globs, train.py run folders or sweep folders (every run inside)."""
    specs = checkpoint_specs(specs)
    if not specs:
        raise CheckpointError("No checkpoint given: pass ckpt=path/to/model.ckpt (or a glob, run or sweep folder).")
    found: list[Path] = []
    for spec in specs:
        matches = [Path(p) for p in sorted(glob.glob(str(Path(spec).expanduser())))] or [Path(spec).expanduser()]
        for path in matches:
            if path.is_file():
                found.append(path)
            elif (path / "checkpoints").is_dir():
                found.append(RunFolder(path).best_checkpoint())
            elif path.is_dir() and (runs := sorted(p.parent for p in path.glob("*/checkpoints"))):
                found.extend(RunFolder(r).best_checkpoint() for r in runs)
            else:
                raise CheckpointError(
                    f"Checkpoint not found: {spec}. Give a .ckpt file, a glob, a train.py run folder "
                    "(with checkpoints/) or a multirun folder."
                )
    return list(dict.fromkeys(found))


def choose_device(device: str = "auto") -> torch.device:
    """``auto`` = the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def same_classes(members: Sequence[Member]) -> list[str]:
    """The common class order of an ensemble; members with other classes (or order) cannot be averaged."""
    orders = {tuple(m.class_names) for m in members}
    if len(orders) > 1:
        raise CheckpointError(f"Class set mismatch between checkpoints: {sorted(orders)}. Ensemble like with like.")
    return list(orders.pop())


def load_member(path: Path, name: str | None = None, device: str | torch.device = "cpu") -> Member:
    """Rebuild a LesionClassifier from a checkpoint (weights only; no pretrained download)."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"Checkpoint not found: {path}.") from err
    except Exception as err:
        raise CheckpointError(
            f"{path} is not a loadable LesionNet checkpoint ({type(err).__name__}: {str(err)[:200]}). "
            "Only checkpoints written by train.py can be used; untrusted pickles are refused."
        ) from err
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not hparams or any(k not in hparams for k in REQUIRED_HPARAMS) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path} is not a LesionNet checkpoint (no hyper_parameters with {list(REQUIRED_HPARAMS)}). "
            "Give a checkpoint written by train.py."
        )
    model = LesionClassifier(**{**hparams, "pretrained": False, "pretrained_file": None})
    model.load_state_dict(checkpoint["state_dict"])
    model.eval().to(device)
    run = RunFolder.of_checkpoint(path)
    sha256 = file_sha256(path)
    label = name or re.sub(r"[^A-Za-z0-9._-]+", "-", f"{hparams['backbone']}-{run.name if run else path.stem}")
    return Member(
        name=label,
        path=path,
        model=model,
        sha256=sha256,
        provenance=Provenance.from_checkpoint(checkpoint, path),
        run=run,
        epoch=checkpoint.get("epoch"),
    )


def load_members(specs: str | Sequence[str] | ListConfig, device: str = "auto") -> list[Member]:
    """Every checkpoint of ``specs``, on one device, with one class order and unique display names."""
    target = choose_device(device)
    members = [load_member(p, device=target) for p in resolve_checkpoints(specs)]
    same_classes(members)
    seen: dict[str, int] = {}
    for member in members:  # two copies of a run's checkpoints keep apart in tables and file names
        seen[member.name] = seen.get(member.name, 0) + 1
        if seen[member.name] > 1:
            member.name = f"{member.name}-{member.sha256[:8]}"
    return members


SHIPPED_KEYS = ("hyper_parameters", "state_dict", "epoch", "global_step", "pytorch-lightning_version")


def half_precision_checkpoint(source: Path, out: Path) -> Path:
    """A copy of a train.py checkpoint to ship: the weights in float16 (half the bytes; predictions move by ~1e-3),
    no optimizer or loop state, the same provenance record bound again to the float16 weights.

    The record is first checked against the original weights (``Provenance.from_checkpoint`` raises if it is not the
    one saved with them), so the new binding vouches for nothing the old one did not. The copy is a new model file
    (a new sha256): evaluate it and fit the app's gates on it, not on the original."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not hparams or any(k not in hparams for k in REQUIRED_HPARAMS) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{source} is not a LesionNet checkpoint: give one written by train.py.")
    provenance = Provenance.from_checkpoint(checkpoint, source)
    slim = {key: checkpoint[key] for key in SHIPPED_KEYS if key in checkpoint}
    slim["state_dict"] = {
        name: tensor.half() if tensor.is_floating_point() else tensor
        for name, tensor in checkpoint["state_dict"].items()
    }
    if provenance is not None:
        provenance.store(slim)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(slim, out)
    return out
