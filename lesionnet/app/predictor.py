"""The loaded model (one checkpoint or an ensemble) applied to in-memory images, as evaluate.py applies it.

Each member keeps its own preprocessing (``build_eval_transform`` of its checkpoint's data config), the ensemble is
the mean of the members' softmaxes and TTA views are averaged, exactly as in ``lesionnet.evaluation``, so a
threshold chosen by evaluate.py on validation data means the same thing here.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lesionnet.data.transforms import build_eval_transform
from lesionnet.evaluation.checkpoints import CheckpointError, Member, load_member, resolve_checkpoints
from lesionnet.evaluation.predict import tta_views


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Output:
    """Raw (uncalibrated) ensemble probabilities and the two confidence scores the refusal gate can use."""

    probs: np.ndarray     # (K,) mean softmax over members and TTA views
    msp: float            # max softmax probability (Hendrycks & Gimpel 2017)
    neg_energy: float     # logsumexp of the logits, averaged over members and views (Liu et al. 2020); higher = ID


class Predictor:
    """Members loaded once; ``lock`` serialises forward passes, since Grad-CAM hooks live on the shared modules."""

    def __init__(self, members: Sequence[Member], tta: str = "none") -> None:
        if not members:
            raise CheckpointError("No model to serve.")
        names = {tuple(m.class_names) for m in members}
        if len(names) > 1:
            raise CheckpointError(f"Class set mismatch between checkpoints: {sorted(names)}. Ensemble like with like.")
        tta_views(torch.zeros(1, 3, 2, 2), tta)  # validates the mode now, not at the first request
        self.members = list(members)
        self.tta = tta
        self.class_names: list[str] = list(members[0].class_names)
        self.transforms = [build_eval_transform(m.data_config) for m in members]
        self.device = next(members[0].model.parameters()).device
        self.lock = threading.Lock()
        hashes = [file_sha256(m.path) for m in members]
        self.checkpoints = [{"name": m.name, "file": m.path.name, "sha256": h} for m, h in zip(members, hashes,
                                                                                               strict=True)]
        combined = hashlib.sha256("".join(hashes).encode()).hexdigest()[:12]
        self.version = f"{'+'.join(m.name for m in members)}@{combined}"

    @classmethod
    def from_checkpoints(cls, specs: str | list[str], device: str = "auto", tta: str = "none") -> Predictor:
        """Resolve ``specs`` like evaluate.py (files, globs, run or sweep folders) and load every member."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls([load_member(p, device=device) for p in resolve_checkpoints(specs)], tta=tta)

    def _tensor(self, index: int, images: Sequence[np.ndarray]) -> torch.Tensor:
        batch = torch.stack([self.transforms[index](image=img)["image"] for img in images])
        return batch.to(self.device)

    @torch.inference_mode()
    def predict_batch(self, images: Sequence[np.ndarray]) -> list[Output]:
        """Outputs for RGB uint8 arrays (H, W, 3) of any size."""
        probs, energies = [], []
        for i, member in enumerate(self.members):
            for view in tta_views(self._tensor(i, images), self.tta):
                logits = member.model(view).float()
                probs.append(logits.softmax(dim=-1))
                energies.append(torch.logsumexp(logits, dim=-1))
        p = torch.stack(probs).mean(0).double().cpu().numpy()
        e = torch.stack(energies).mean(0).double().cpu().numpy()
        return [Output(probs=p[k], msp=float(p[k].max()), neg_energy=float(e[k])) for k in range(len(images))]

    def predict(self, image: np.ndarray) -> Output:
        return self.predict_batch([image])[0]

    def input_tensor(self, image: np.ndarray, member: int = 0) -> torch.Tensor:
        """The preprocessed (1, 3, h, w) input of one member, for Grad-CAM."""
        return self._tensor(member, [image])

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "checkpoints": self.checkpoints, "class_names": self.class_names,
                "tta": self.tta, "device": str(self.device),
                "input_sizes": [list(m.data_config["input_size"]) for m in self.members]}
