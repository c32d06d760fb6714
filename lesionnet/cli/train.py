"""``lesionnet train`` / ``python train.py``: Hydra entry point of :func:`lesionnet.training.train`."""

import hydra
from omegaconf import DictConfig

from lesionnet.cli import CONF_DIR
from lesionnet.training import train


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
