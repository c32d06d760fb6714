"""Integrity of a downloaded file (size, MD5, zip CRCs) and safe unpacking of a verified one."""

from __future__ import annotations

import hashlib
import re
import shutil
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import NoReturn

from tqdm import tqdm

from lesionnet.data.download.config import DownloadError, FileSpec
from lesionnet.data.download.fetch import CHUNK

JUNK_PARTS = frozenset({"__MACOSX", ".DS_Store"})


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
