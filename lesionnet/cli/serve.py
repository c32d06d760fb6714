"""``lesionnet serve ckpt=... [scores=.../scores.json] [host=...] [port=...]`` (= ``python -m lesionnet.app``)."""

import hydra
from omegaconf import DictConfig

from lesionnet.cli import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    import uvicorn  # the app extra; imported here so `lesionnet serve --help` works without it

    from lesionnet.app.build import build_app

    uvicorn.run(build_app(cfg), host=cfg.host, port=cfg.port, log_level="info")


if __name__ == "__main__":
    main()
