"""Score checkpoints and ensembles: ``python evaluate.py ckpt=... [ensemble=greedy] [tta=flips] [data.images=...]``."""

import hydra
from omegaconf import DictConfig

from lesionnet.evaluation.runner import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
