"""``lesionnet serve ckpt=... [scores=.../scores.json] [host=...] [port=...] [ssl_certfile=... ssl_keyfile=...]``:
Hydra entry point of the web app and REST API (``lesionnet.app.server``)."""

import hydra
from omegaconf import DictConfig

from lesionnet.app.server import serve
from lesionnet.cli import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    serve(cfg)


if __name__ == "__main__":
    main()
