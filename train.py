"""Train a LesionNet model: ``python train.py [model=...] [data.root=...] [experiment=...]``."""

import hydra
from omegaconf import DictConfig

from lesionnet.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
