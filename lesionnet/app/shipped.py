"""The model that ships in the repository, served when ``lesionnet serve`` / ``lesionnet predict`` get no ``ckpt``.

``models/lite0-ham10000/`` (the repository root; ``scripts/ship_model.py`` writes it) is a train.py run folder plus
what the app needs to serve it with no data at hand:

* ``checkpoints/model.ckpt``: the weights in float16 with their provenance (``half_precision_checkpoint``);
* ``split.csv``, ``metrics.json``: the run's split and metrics (the model card's training data);
* ``scores.json``: evaluate.py's scores of that very file (the referral threshold, calibration, figures);
* ``gates/confidence_gate.json``, ``gates/ood_gate.json``, ``gates/image_type_gate.json``: the three fitted gates;
* ``MODEL_CARD.md``: data, split, figures with intervals, licence.

An explicit ``ckpt=`` (a run of one's own, the demo trained on the embedded sample) serves that instead and takes
none of these files.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)
SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "lite0-ham10000"
GATE_FILES = {"unsure": "confidence_gate.json", "ood": "ood_gate.json", "image_type": "image_type_gate.json"}


def with_shipped_model(cfg: DictConfig, folder: Path = SHIPPED_MODEL) -> DictConfig:
    """``cfg`` unchanged when it names a ``ckpt``; else the shipped model with its scores.json and gate files (each
    only where the config does not give one)."""
    if cfg.ckpt:
        return cfg
    checkpoint = folder / "checkpoints" / "model.ckpt"
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"No ckpt given and no shipped model at {checkpoint} (it lives in the repository's models/ folder, not in "
            "an installed wheel). Pass ckpt=<a train.py run folder or .ckpt>."
        )
    with open_dict(cfg):
        cfg.ckpt = str(checkpoint)
        if not cfg.scores and (folder / "scores.json").is_file():
            cfg.scores = str(folder / "scores.json")
        for group, name in GATE_FILES.items():
            if not cfg[group].get("gate_file") and (folder / "gates" / name).is_file():
                cfg[group].gate_file = str(folder / "gates" / name)
    log.info("No ckpt given: serving the shipped model %s", folder)
    return cfg
