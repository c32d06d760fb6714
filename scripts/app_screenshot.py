"""The app screenshot in docs/app.md, reproducible: serve a model, upload an image in a phone-sized Chromium, save it.

    python scripts/app_screenshot.py --image <lesion image> --out docs/app_screenshot.png -- \
        ckpt=logs/train/runs/<run> scores=logs/eval/runs/<eval>/scores.json

Everything after ``--`` goes to ``lesionnet serve`` as Hydra overrides. Needs Debian's Chromium and Playwright
(``bash scripts/install_browser.sh``).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = Path(os.environ.get("LESIONNET_CHROMIUM", "/usr/bin/chromium"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    """Poll /healthz until it answers; fail early (with the server's output) when the server exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"lesionnet serve exited with {server.returncode}:\n{server.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"lesionnet serve did not answer {url}/healthz within {timeout_s:.0f} s.")


def screenshot(url: str, image: Path, out: Path, width: int, height: int, full_page: bool) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=2, is_mobile=True)
        page.goto(url + "/")
        page.set_input_files("#file", str(image))
        page.click("#submit")
        expect(page.locator("#result")).to_be_visible(timeout=60_000)
        expect(page.locator("#cam-box")).to_be_visible()
        out.parent.mkdir(parents=True, exist_ok=True)
        if full_page:
            page.screenshot(path=str(out), full_page=True)
        else:  # the answer card: urgency, reasons, classes, heatmap
            page.locator("#result").screenshot(path=str(out))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, required=True, help="the image to upload")
    parser.add_argument("--out", type=Path, default=Path("docs/app_screenshot.png"))
    parser.add_argument("--width", type=int, default=390)
    parser.add_argument("--height", type=int, default=844)
    parser.add_argument("--full-page", action="store_true", help="the whole page, not only the answer card")
    parser.add_argument("--start-timeout-s", type=float, default=600, help="a first start fits the gates")
    parser.add_argument("overrides", nargs="*", help="lesionnet serve overrides (after --), e.g. ckpt=... scores=...")
    args = parser.parse_args()
    if not args.image.is_file():
        raise SystemExit(f"No image at {args.image}: give --image <a lesion photo>.")
    if not CHROMIUM.is_file():
        raise SystemExit(f"No Chromium at {CHROMIUM}: run bash scripts/install_browser.sh (or set LESIONNET_CHROMIUM).")
    port = free_port()
    command = [sys.executable, "-m", "lesionnet.cli.serve", f"port={port}", "host=127.0.0.1", *args.overrides]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}", server, args.start_timeout_s)
        screenshot(f"http://127.0.0.1:{port}", args.image, args.out, args.width, args.height, args.full_page)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
