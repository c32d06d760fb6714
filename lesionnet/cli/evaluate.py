"""``lesionnet evaluate`` / ``python evaluate.py``: Hydra entry point of ``lesionnet.evaluation.runner.evaluate``."""

import hydra
from omegaconf import DictConfig

from lesionnet.cli import CONF_DIR
from lesionnet.evaluation.runner import evaluate


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
