"""The download config (URLs, sizes, checksums per source), validated before any download starts.

The shipped config is the Hydra group ``lesionnet/conf/download/ham10000.yaml``; a mirror or a test server
is another file of that group (``lesionnet download download=<name>``, ``--config-dir`` for one outside the
package) or any YAML file given to :func:`load_config`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path, PurePosixPath
from typing import Any

from omegaconf import OmegaConf

DEFAULT_CONFIG = Path(str(files("lesionnet.conf") / "download" / "ham10000.yaml"))  # the shipped group option
KINDS = ("zip", "metadata")


class DownloadError(RuntimeError):
    """Expected failure (bad download, bad config, unsafe archive); the message says how to fix it."""


@dataclass(frozen=True)
class Settings:
    """HTTP behaviour shared by all files of a run."""

    user_agent: str
    timeout_s: float
    retries: int
    backoff_s: float


@dataclass(frozen=True)
class FileSpec:
    """One file of a source, as the config describes it."""

    name: str
    url: str
    md5: str | None
    size: int | None
    kind: str
    target: str
    strip_prefix: str | None = None


@dataclass(frozen=True)
class Source:
    """Everything needed to turn one host's files into the HAM10000 layout."""

    name: str
    files: tuple[FileSpec, ...]
    expected_images: int | None
    convert: dict[str, str] | None


def _relative_path(value: str, what: str) -> str:
    """Config paths must stay inside DEST; refuse anything that could point elsewhere."""
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", value):
        raise DownloadError(f"{what} must be a relative path inside DEST without '..', got {value!r}")
    return value


def _file_spec(raw: dict[str, Any], where: str) -> FileSpec:
    """Validate one `files` entry so a typo fails before any download starts."""
    missing = [k for k in ("name", "url", "kind", "target") if not raw.get(k)]
    if missing:
        raise DownloadError(f"{where} lacks {missing}; every file needs name, url, kind and target.")
    name = str(raw["name"])
    if "/" in name or "\\" in name or name in (".", ".."):
        raise DownloadError(f"{where}: name must be a plain file name, got {name!r}")
    if raw["kind"] not in KINDS:
        raise DownloadError(f"{where}: kind must be one of {list(KINDS)}, got {raw['kind']!r}")
    md5 = raw.get("md5")
    if md5 is not None and not re.fullmatch(r"[0-9a-fA-F]{32}", str(md5)):
        raise DownloadError(f"{where}: md5 must be 32 hex digits or null, got {md5!r}")
    size = raw.get("size")
    return FileSpec(
        name=name,
        url=str(raw["url"]),
        md5=str(md5).lower() if md5 else None,
        size=int(size) if size is not None else None,
        kind=str(raw["kind"]),
        target=_relative_path(str(raw["target"]), f"{where}: target"),
        strip_prefix=raw.get("strip_prefix"),
    )


def load_config(config: Path | Mapping[str, Any], source_name: str) -> tuple[Settings, Source]:
    """Read the YAML file (or an already composed mapping) and pick one source; mistakes raise DownloadError."""
    if isinstance(config, Mapping):
        cfg: Any = dict(config)
        path: str | Path = "the download config"
    else:
        path = config
        if not config.is_file():
            raise DownloadError(
                f"Download config not found: {path}. Give an existing download YAML, or pick an option of the "
                "download group: lesionnet download download=ham10000 (lesionnet/conf/download/)."
            )
        try:
            cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except Exception as err:  # OmegaConf raises several unrelated types for bad YAML
            raise DownloadError(f"Cannot read {path}: {err}") from err
    sources = cfg.get("sources") if isinstance(cfg, dict) else None
    if not isinstance(sources, dict) or not sources:
        raise DownloadError(f"{path} has no 'sources' mapping.")
    if source_name not in sources:
        raise DownloadError(f"Unknown source {source_name!r}; {path} defines {sorted(sources)}: pass source=<one>.")
    raw = sources[source_name] or {}
    files = raw.get("files") or []
    if not files:
        raise DownloadError(f"{path}: source {source_name!r} lists no files.")
    specs = tuple(_file_spec(f, f"{path}: sources.{source_name}.files[{i}]") for i, f in enumerate(files))
    settings = Settings(
        user_agent=str(cfg.get("user_agent") or "lesionnet-download"),
        timeout_s=float(cfg.get("timeout_s") or 60),
        retries=int(cfg.get("retries") if cfg.get("retries") is not None else 4),
        backoff_s=float(cfg.get("backoff_s") if cfg.get("backoff_s") is not None else 2.0),
    )
    expected = raw.get("expected_images")
    source = Source(source_name, specs, int(expected) if expected else None, raw.get("convert"))
    return settings, source
