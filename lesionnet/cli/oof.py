"""``lesionnet oof sweep=<multirun folder>``: Hydra entry point of :func:`lesionnet.evaluation.oof.out_of_fold`."""

import hydra
from omegaconf import DictConfig

from lesionnet.cli import CONF_DIR
from lesionnet.evaluation.oof import out_of_fold, summary_text


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="oof")
def main(cfg: DictConfig) -> None:
    print(summary_text(out_of_fold(cfg), cfg.paths.output_dir))


if __name__ == "__main__":
    main()
