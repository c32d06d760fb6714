#!/usr/bin/env bash
# Install what tests/test_app_browser.py (and docs/app.md's screenshot) need: Debian's Chromium and Playwright for
# Python in .venv. Playwright drives /usr/bin/chromium directly; `playwright install` (a browser download) is not used.
# Without them the browser test skips itself. Run as root (or with sudo) on Debian/Ubuntu.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi
.venv/bin/python -m pip install --quiet -c constraints.txt playwright
/usr/bin/chromium --version 2>/dev/null
.venv/bin/python -c "from importlib.metadata import version; print('playwright', version('playwright'))"
