"""One download run: skip what an earlier run installed, fetch, verify, install, convert, read back.

What was installed is recorded in ``DEST/.download_state.json``; a second run checks that record and
downloads nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lesionnet.data.download.archive import install, verify
from lesionnet.data.download.config import DownloadError, FileSpec, Settings, Source, load_config
from lesionnet.data.download.convert import CONVERTERS
from lesionnet.data.download.fetch import download
from lesionnet.data.metadata import METADATA_FILE, DatasetError, load_ham10000

PARTIAL_DIR = ".partial"
DOWNLOADS_DIR = ".downloads"
STATE_FILE = ".download_state.json"


def read_state(dest: Path) -> dict[str, Any]:
    """What earlier runs installed; an unreadable record just means 'check everything again'."""
    try:
        return json.loads((dest / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_state(dest: Path, state: dict[str, Any]) -> None:
    """Write atomically so an interrupted run never leaves a half-written record."""
    tmp = dest / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    tmp.replace(dest / STATE_FILE)


def is_installed(spec: FileSpec, dest: Path, state: dict[str, Any]) -> bool:
    """True if an earlier run installed this exact file and all it wrote is still there, same size."""
    entry = state.get(spec.name)
    if not entry or entry.get("url") != spec.url or entry.get("md5") != spec.md5 or not entry.get("files"):
        return False
    for rel, size in entry["files"].items():
        file = dest / rel
        if not file.is_file() or file.stat().st_size != size:
            return False
    return True


def fetch_file(spec: FileSpec, dest: Path, settings: Settings, state: dict[str, Any], keep: bool) -> None:
    """Download (or reuse a kept archive), verify, install and record one file."""
    archive = dest / DOWNLOADS_DIR / spec.name
    if archive.is_file():
        print(f"{spec.name}: verifying the kept archive {archive}")
        verify(archive, spec)
    else:
        part = dest / PARTIAL_DIR / f"{spec.name}.part"
        print(f"{spec.name}: downloading from {spec.url}")
        download(spec, part, settings)
        verify(part, spec)
        archive.parent.mkdir(parents=True, exist_ok=True)
        part.replace(archive)
    files = install(archive, spec, dest)
    state[spec.name] = {"url": spec.url, "md5": spec.md5, "files": files}
    write_state(dest, state)
    if not keep:
        archive.unlink()
    print(f"{spec.name}: verified and installed ({len(files)} file(s))")


def clear_previous(spec: FileSpec, dest: Path, state: dict[str, Any]) -> None:
    """force=true: forget the record and drop partial or kept copies so the file is fetched anew."""
    state.pop(spec.name, None)
    (dest / PARTIAL_DIR / f"{spec.name}.part").unlink(missing_ok=True)
    (dest / DOWNLOADS_DIR / spec.name).unlink(missing_ok=True)


def check_dataset(dest: Path, source: Source) -> int:
    """Read the result back the way training will, so success here means training can start."""
    table = load_ham10000(dest)
    if source.expected_images is not None and len(table) != source.expected_images:
        raise DatasetError(
            f"{dest / METADATA_FILE} lists {len(table)} images; the {source.name} source should give "
            f"{source.expected_images}. Run the command again with force=true to fetch fresh copies."
        )
    return len(table)


def run(dest: Path, config: Path | Mapping[str, Any], source_name: str, keep: bool = False, force: bool = False) -> int:
    """Make ``dest`` a complete, verified HAM10000 folder; returns the number of images."""
    settings, source = load_config(config, source_name)
    dest.mkdir(parents=True, exist_ok=True)
    state = read_state(dest)
    for spec in source.files:
        if force:
            clear_previous(spec, dest, state)
        if is_installed(spec, dest, state):
            print(f"{spec.name}: already installed and unchanged, skipping")
            continue
        fetch_file(spec, dest, settings, state, keep)
    if source.convert:
        kind = source.convert.get("kind")
        if kind not in CONVERTERS:
            where = config if isinstance(config, Path) else "the download config"
            raise DownloadError(
                f"{where}: unknown convert kind {kind!r} in source {source_name!r}; known: {sorted(CONVERTERS)}."
            )
        CONVERTERS[kind](dest, source.convert)
    for work_dir in (PARTIAL_DIR, DOWNLOADS_DIR):  # leave no empty bookkeeping folders behind
        if (dest / work_dir).is_dir() and not any((dest / work_dir).iterdir()):
            (dest / work_dir).rmdir()
    return check_dataset(dest, source)
