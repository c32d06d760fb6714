"""``lesionnet eda data.root=... [out_dir=docs/eda]``: the EDA report of a HAM10000 folder (lesionnet/conf/eda.yaml)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lesionnet.cli import CONF_DIR
from lesionnet.eda import write_eda_report

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Path:
    """Build the DataModule exactly as training does (same split), then write the report."""
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup()
    if dm.split_file:
        split = f"from `{dm.split_file}`"
    elif getattr(dm, "split", "lesion") == "legacy":
        split = f"legacy image-level split of the seed project, seed {dm.split_seed}"
    else:
        split = f"by lesion, fractions {OmegaConf.to_container(cfg.data.split_fractions)}, seed {dm.split_seed}"
    details = {"data root": f"`{cfg.data.root or dm.root}`", "split": split}
    return write_eda_report(
        dm.table,
        Path(cfg.out_dir),
        cfg.title,
        sample_grid=cfg.sample_grid,
        images_per_class=cfg.images_per_class,
        grid_columns=cfg.grid_columns,
        seed=cfg.sample_seed,
        details=details,
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eda")
def main(cfg: DictConfig) -> None:
    path = run(cfg)
    log.info("EDA report written: %s", path)


if __name__ == "__main__":
    main()
