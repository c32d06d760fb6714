"""HTTP fetch with resume: Range requests, retries with backoff, servers that ignore or mangle Range."""

from __future__ import annotations

import http.client
import re
import sys
import time
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tqdm import tqdm

from lesionnet.data.download.config import DownloadError, FileSpec, Settings

CHUNK = 1 << 20
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class TransientError(Exception):
    """A network hiccup worth retrying; the partial file is kept so the retry resumes."""


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
