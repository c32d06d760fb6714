"""``python -m lesionnet.app ckpt=... [scores=.../scores.json] [host=127.0.0.1] [port=8000]`` (conf/serve.yaml)."""

import hydra
import uvicorn
from omegaconf import DictConfig

from lesionnet.app.build import build_app


@hydra.main(version_base="1.3", config_path="../../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    uvicorn.run(build_app(cfg), host=cfg.host, port=cfg.port, log_level="info")


if __name__ == "__main__":
    main()
