"""``lesionnet export ckpt=... [format=onnx|torchscript] [out=...]``: Hydra entry point of ``lesionnet.export``."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from lesionnet.cli import CONF_DIR
from lesionnet.export import ExportError, export
from lesionnet.inference import load_member, resolve_checkpoints


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    paths = resolve_checkpoints(cfg.ckpt)
    if cfg.out and len(paths) > 1:
        raise ExportError(f"out= names one file but ckpt gives {len(paths)} checkpoints; export them one by one.")
    for p in paths:
        export(
            load_member(p),
            cfg.format,
            Path(cfg.out) if cfg.out else None,
            cfg.opset,
            cfg.atol,
            list(cfg.parity_images) if cfg.parity_images else None,
        )


if __name__ == "__main__":
    main()
