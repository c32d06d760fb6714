"""``lesionnet serve ckpt=... [scores=.../scores.json] [host=...] [port=...]`` (= ``python -m lesionnet.app``)."""

import hydra
import uvicorn
from omegaconf import DictConfig

from lesionnet.app.build import build_app
from lesionnet.cli import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    uvicorn.run(build_app(cfg), host=cfg.host, port=cfg.port, log_level="info")


if __name__ == "__main__":
    main()
