"""Fetch the full HAM10000 dataset, check it, and unpack it into the layout ``load_ham10000`` reads.

    python -m lesionnet.data.download --dest DIR [--config PATH] [--source dataverse|isic]

Downloads go to ``DIR/.partial/NAME.part`` and resume with HTTP Range requests, because the image
archives are gigabytes on slow hosts and a restart from zero after every dropped connection would
rarely finish. Every file is checked (size and MD5 where the config knows them, the CRC of every zip
member always) before anything is unpacked, and the unpacked folder is then read back with
``load_ham10000`` so a run that reports success has a dataset training can use. What was installed is
recorded in ``DIR/.download_state.json``; a second run checks that record and downloads nothing.
URLs and checksums live in ``conf/download/ham10000.yaml``.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import re
import shutil
import sys
import time
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

import pandas as pd
from omegaconf import OmegaConf
from tqdm import tqdm

from lesionnet.data.isic import isic_onehot_to_dx
from lesionnet.data.metadata import METADATA_FILE, DatasetError, load_ham10000

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "download" / "ham10000.yaml"
PARTIAL_DIR = ".partial"
DOWNLOADS_DIR = ".downloads"
STATE_FILE = ".download_state.json"
CHUNK = 1 << 20
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
JUNK_PARTS = frozenset({"__MACOSX", ".DS_Store"})
KINDS = ("zip", "metadata")


class DownloadError(RuntimeError):
    """Expected failure (bad download, bad config, unsafe archive); the message says how to fix it."""


class TransientError(Exception):
    """A network hiccup worth retrying; the partial file is kept so the retry resumes."""


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


# --------------------------------------------------------------------------- config


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


def load_config(path: Path, source_name: str) -> tuple[Settings, Source]:
    """Read the YAML and pick one source; all config mistakes surface here as DownloadError."""
    if not path.is_file():
        raise DownloadError(f"Download config not found: {path}. Pass --config PATH to a download YAML.")
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # OmegaConf raises several unrelated types for bad YAML
        raise DownloadError(f"Cannot read {path}: {err}") from err
    sources = cfg.get("sources") if isinstance(cfg, dict) else None
    if not isinstance(sources, dict) or not sources:
        raise DownloadError(f"{path} has no 'sources' mapping.")
    if source_name not in sources:
        raise DownloadError(f"Unknown source {source_name!r}; {path} defines {sorted(sources)}.")
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


# --------------------------------------------------------------------------- HTTP


def _content_range_start(response: http.client.HTTPResponse) -> tuple[int, int | None] | None:
    """(first byte, total) from a 206's Content-Range, or None if it is missing or unparsable."""
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
    if not match:
        return None
    return int(match[1]), None if match[2] == "*" else int(match[2])


def _open(spec: FileSpec, offset: int, settings: Settings) -> http.client.HTTPResponse | None:
    """GET the file from ``offset``; None means the server says there is nothing left (HTTP 416)."""
    headers = {"User-Agent": settings.user_agent}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urlopen(Request(spec.url, headers=headers), timeout=settings.timeout_s)
    except HTTPError as err:
        if err.code == 416 and offset:
            return None
        if err.code in RETRY_STATUS:
            raise TransientError(f"HTTP {err.code} {err.reason}") from err
        raise DownloadError(
            f"{spec.url} answered HTTP {err.code} {err.reason} for {spec.name}. "
            "Check the url in the download config, or try again later if the host is down."
        ) from err
    except (URLError, OSError, http.client.HTTPException) as err:
        raise TransientError(str(getattr(err, "reason", err))) from err
    except ValueError as err:  # urllib's answer to a malformed or unsupported url
        raise DownloadError(f"Cannot download {spec.name}: {err}. Fix its url in the download config.") from err


def _start_and_total(response: http.client.HTTPResponse, offset: int, spec: FileSpec) -> tuple[int, int | None]:
    """Where the body starts in the file: servers that ignore Range send the whole file (200)."""
    length = response.headers.get("Content-Length")
    if offset and response.status == 206:
        parsed = _content_range_start(response)
        if parsed is None or parsed[0] != offset:
            raise TransientError(f"server answered Range bytes={offset}- with {response.headers.get('Content-Range')}")
        return offset, parsed[1] or spec.size
    if offset:
        print(f"{spec.name}: server ignored the Range request; downloading again from byte 0")
    return 0, int(length) if length is not None else spec.size


def _read(response: http.client.HTTPResponse) -> bytes:
    """One chunk of the body; network failures become TransientError so the caller resumes."""
    try:
        return response.read(CHUNK)
    except (OSError, http.client.HTTPException) as err:
        raise TransientError(f"connection lost: {err!r}") from err


def _download_once(spec: FileSpec, part: Path, settings: Settings) -> None:
    """Bring ``part`` to the full file in one HTTP request, appending to what is already there."""
    offset = part.stat().st_size if part.exists() else 0
    if spec.size is not None and offset > spec.size:
        part.unlink()
        offset = 0
    if spec.size is not None and offset == spec.size:
        return
    response = _open(spec, offset, settings)
    if response is None:
        return
    with response:
        try:
            start, total = _start_and_total(response, offset, spec)
        except TransientError:
            part.unlink()  # the server will not continue where we stopped: the retry starts from 0
            raise
        with (
            part.open("ab" if start else "wb") as out,
            tqdm(
                total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=spec.name, leave=False
            ) as bar,
        ):
            while chunk := _read(response):
                out.write(chunk)
                bar.update(len(chunk))
    expected = total if total is not None else spec.size
    got = part.stat().st_size
    if expected is not None and got < expected:
        raise TransientError(f"connection closed after {got} of {expected} bytes")


def download(spec: FileSpec, part: Path, settings: Settings) -> None:
    """Download with retries and exponential backoff; each retry resumes from the partial file."""
    part.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(settings.retries + 1):
        try:
            _download_once(spec, part, settings)
            return
        except TransientError as err:
            if attempt == settings.retries:
                raise DownloadError(
                    f"Downloading {spec.name} from {spec.url} failed after {attempt + 1} attempt(s): {err}. "
                    f"Run the command again; it resumes from the {part.stat().st_size if part.exists() else 0} "
                    f"bytes kept in {part}."
                ) from err
            wait = settings.backoff_s * 2**attempt
            print(f"{spec.name}: {err}; retrying in {wait:.1f} s", file=sys.stderr)
            time.sleep(wait)


# --------------------------------------------------------------------------- integrity


def md5_of(path: Path) -> str:
    """MD5 of a file, read in chunks so multi-GB archives do not need the memory."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _reject(path: Path, problem: str) -> NoReturn:
    """Delete a bad download so the next run fetches it afresh instead of trusting it again."""
    path.unlink(missing_ok=True)
    raise DownloadError(f"{problem}. Deleted {path}; run the command again to download it afresh.")


def _check_zip(path: Path, spec: FileSpec) -> None:
    """CRC-check every member: catches corruption even where the config has no MD5."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        _reject(path, f"{spec.name} is not a readable zip archive ({err})")
    if bad is not None:
        _reject(path, f"{spec.name} is corrupt: member {bad} fails its CRC check")


def verify(path: Path, spec: FileSpec) -> None:
    """Size, MD5 (when known) and zip CRCs; any failure deletes the file and says so."""
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        _reject(path, f"{spec.name} is {size} bytes, expected {spec.size}")
    if spec.md5 is not None:
        actual = md5_of(path)
        if actual != spec.md5:
            _reject(path, f"MD5 mismatch for {spec.name}: expected {spec.md5}, got {actual}")
    if spec.kind == "zip":
        _check_zip(path, spec)


# --------------------------------------------------------------------------- unpacking


def _member_parts(name: str, strip: set[str]) -> tuple[str, ...] | None:
    """Where a member goes under the target folder; None for folders and OS junk; raises if unsafe."""
    normalized = name.replace("\\", "/")
    parts = PurePosixPath(normalized).parts
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized) or ".." in parts:
        raise ValueError(name)
    if normalized.endswith("/") or not parts or JUNK_PARTS.intersection(parts):
        return None
    if len(parts) > 1 and parts[0] in strip:
        parts = parts[1:]
    return parts


def _plan_unpack(archive: zipfile.ZipFile, spec: FileSpec, path: Path) -> list[tuple[zipfile.ZipInfo, str]]:
    """Map every member to its destination before writing anything, so an unsafe zip writes nothing."""
    strip = {PurePosixPath(spec.target).name} | ({spec.strip_prefix} if spec.strip_prefix else set())
    plan = []
    for info in archive.infolist():
        try:
            parts = _member_parts(info.filename, strip)
        except ValueError:
            path.unlink(missing_ok=True)
            raise DownloadError(
                f"Refusing to unpack {spec.name}: member {info.filename!r} has an absolute path or '..' and "
                f"would be written outside {spec.target}/. Deleted {path}; this archive is not the expected "
                "one, so check its url in the download config before running again."
            ) from None
        if parts is not None:
            plan.append((info, str(PurePosixPath(spec.target, *parts))))
    return plan


def unpack(path: Path, spec: FileSpec, dest: Path) -> dict[str, int]:
    """Extract a verified zip safely; returns {path relative to DEST: size} of what it wrote."""
    written: dict[str, int] = {}
    with zipfile.ZipFile(path) as archive:
        plan = _plan_unpack(archive, spec, path)
        for info, rel in tqdm(plan, desc=f"unpack {spec.name}", unit="file", leave=False):
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
            written[rel] = info.file_size
    return written


def install(path: Path, spec: FileSpec, dest: Path) -> dict[str, int]:
    """Put a verified file where the layout wants it: unpack a zip, copy a metadata file."""
    if spec.kind == "zip":
        return unpack(path, spec, dest)
    out = dest / spec.target
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, out)
    return {spec.target: out.stat().st_size}


# --------------------------------------------------------------------------- state


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


# --------------------------------------------------------------------------- ISIC conversion


def build_isic_metadata(dest: Path, convert: dict[str, str]) -> None:
    """Write HAM10000_metadata.csv from ISIC 2018's one-hot labels plus its lesion groupings.

    The lesion id is what keeps images of one lesion in one split; without the groupings file a split
    would leak, so a missing lesion id is an error rather than a fallback to one lesion per image.
    """
    gt_path, groups_path = dest / convert["ground_truth"], dest / convert["lesion_groupings"]
    for p in (gt_path, groups_path):
        if not p.is_file():
            raise DatasetError(
                f"{p} is missing after unpacking, so the archives are laid out differently from what the "
                "download config expects: check the target, strip_prefix and convert paths of this source."
            )
    gt, groups = pd.read_csv(gt_path), pd.read_csv(groups_path, dtype=str)
    if not {"image", "lesion_id"} <= set(groups.columns):
        raise DatasetError(f"{groups_path} needs columns image,lesion_id; found {list(groups.columns)}.")
    labels = isic_onehot_to_dx(gt, gt_path)
    merged = labels.merge(groups, on="image", how="left")
    orphans = merged["lesion_id"].isna()
    if orphans.any():
        raise DatasetError(
            f"{int(orphans.sum())} image(s) in {gt_path.name} have no lesion_id in {groups_path.name}: "
            f"{list(merged.loc[orphans, 'image'][:5])}. A lesion-level split needs every lesion id."
        )
    out = pd.DataFrame(
        {
            "lesion_id": merged["lesion_id"],
            "image_id": merged["image"],
            "dx": merged["dx"],
            "dx_type": merged.get("diagnosis_confirm_type", pd.Series("", index=merged.index)),
            "age": "",
            "sex": "",
            "localization": "",
        }
    )
    out.to_csv(dest / METADATA_FILE, index=False)


CONVERTERS = {"isic2018_task3": build_isic_metadata}


# --------------------------------------------------------------------------- orchestration


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
    """--force: forget the record and drop partial or kept copies so the file is fetched anew."""
    state.pop(spec.name, None)
    (dest / PARTIAL_DIR / f"{spec.name}.part").unlink(missing_ok=True)
    (dest / DOWNLOADS_DIR / spec.name).unlink(missing_ok=True)


def check_dataset(dest: Path, source: Source) -> int:
    """Read the result back the way training will, so success here means training can start."""
    table = load_ham10000(dest)
    if source.expected_images is not None and len(table) != source.expected_images:
        raise DatasetError(
            f"{dest / METADATA_FILE} lists {len(table)} images; the {source.name} source should give "
            f"{source.expected_images}. Run the command again with --force to fetch fresh copies."
        )
    return len(table)


def run(dest: Path, config: Path, source_name: str, keep: bool = False, force: bool = False) -> int:
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
            raise DownloadError(f"{config}: unknown convert kind {kind!r}; known: {sorted(CONVERTERS)}.")
        CONVERTERS[kind](dest, source.convert)
    for work_dir in (PARTIAL_DIR, DOWNLOADS_DIR):  # leave no empty bookkeeping folders behind
        if (dest / work_dir).is_dir() and not any((dest / work_dir).iterdir()):
            (dest / work_dir).rmdir()
    return check_dataset(dest, source)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lesionnet.data.download",
        description="Download HAM10000, verify it and unpack it into DEST, ready for data.root=DEST.",
    )
    parser.add_argument("--dest", type=Path, required=True, help="folder to fill (created if missing)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="download YAML (default: %(default)s)")
    parser.add_argument("--source", default="dataverse", help="source in the config: dataverse (default) or isic")
    parser.add_argument("--keep-archives", action="store_true", help=f"keep verified downloads in DEST/{DOWNLOADS_DIR}")
    parser.add_argument("--force", action="store_true", help="download and unpack again even if already installed")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: expected failures print one clear line and exit 1, without a traceback."""
    args = parse_args(argv)
    dest = args.dest.expanduser().resolve()
    try:
        count = run(dest, args.config.expanduser(), args.source, keep=args.keep_archives, force=args.force)
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
    print(f"HAM10000 ready: {count} images. Train with: python train.py data.root={dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
