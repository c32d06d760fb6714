"""``lesionnet export ckpt=... [format=onnx|torchscript] [out=...] [ood_gate=...] [image_type_gate=...]``: Hydra
entry point of ``lesionnet.export``."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from lesionnet.cli import CONF_DIR
from lesionnet.export import ExportError, export
from lesionnet.inference import Predictor, load_member, resolve_checkpoints
from lesionnet.inference.decision.image_type import ImageTypeGate
from lesionnet.inference.decision.ood import OodGate


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    paths = resolve_checkpoints(cfg.ckpt)
    if cfg.out and len(paths) > 1:
        raise ExportError(f"out= names one file but ckpt gives {len(paths)} checkpoints; export them one by one.")
    if (cfg.ood_gate or cfg.get("image_type_gate")) and len(paths) > 1:
        raise ExportError(f"A gate file belongs to one model but ckpt gives {len(paths)} checkpoints.")
    for p in paths:
        member = load_member(p)
        # the app's fitted gate file (logs/serve/gates/...), refused unless fitted for this very model
        version = Predictor([member]).version
        ood = OodGate.load(cfg.ood_gate, version, "none") if cfg.ood_gate else None
        image_type = ImageTypeGate.load(cfg.image_type_gate, version, "none") if cfg.get("image_type_gate") else None
        export(
            member,
            cfg.format,
            Path(cfg.out) if cfg.out else None,
            cfg.opset,
            cfg.atol,
            list(cfg.parity_images) if cfg.parity_images else None,
            ood,
            image_type,
        )


if __name__ == "__main__":
    main()
