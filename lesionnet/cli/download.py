"""``lesionnet download dest=DIR [source=dataverse|isic] [keep_archives=true] [force=true]``: HAM10000, verified.

Expected failures (bad download, bad config, unsafe archive, bad dataset) print one ``error:`` line that says
what to do and exit 1, without a traceback; an interrupted run exits 130 and resumes when run again.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, cast

import hydra
from omegaconf import DictConfig, OmegaConf

from lesionnet.cli import CONF_DIR
from lesionnet.data.download import DownloadError, run
from lesionnet.data.metadata import DatasetError


def fetch(cfg: DictConfig) -> int:
    """Run the download described by the composed config; returns the exit code."""
    if OmegaConf.is_missing(cfg, "dest"):
        print("error: no destination folder. Run: lesionnet download dest=DIR", file=sys.stderr)
        return 1
    dest = Path(cfg.dest).expanduser().resolve()
    config = cast(dict[str, Any], OmegaConf.to_container(cfg.download, resolve=True))  # a config group: a mapping
    try:
        count = run(dest, config, cfg.source, keep=cfg.keep_archives, force=cfg.force)
    except (DownloadError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(
            f"error: {err}. Check that {dest} is writable and has space, then run the command again.", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the command again to resume.", file=sys.stderr)
        return 130
    print(f"HAM10000 ready: {count} images. Train with: lesionnet train data.root={dest}")
    return 0


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="download")
def main(cfg: DictConfig) -> None:
    code = fetch(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
