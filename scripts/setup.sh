#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with pinned versions.
# torch/torchvision are installed first and explicitly, so pip never resolves a different build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt torch torchvision
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,lite,app]"
# Hyper-parameter search (Optuna sweeper, SQLAlchemy < 2), MLflow tracking and the OOD photo set (scikit-image):
# small, and they leave torch alone
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[search,mlflow,ood]"
# The page's on-device mode runs the model in the browser with onnxruntime-web, pinned in package-lock.json and served
# from the app's static files (no CDN): only its WebAssembly bundle and binary are copied. Without npm the app still
# serves; the page then says that the on-device mode is not available.
if command -v npm >/dev/null 2>&1; then
  npm ci --ignore-scripts --no-audit --no-fund --silent
  mkdir -p lesionnet/app/static/vendor/ort
  cp node_modules/onnxruntime-web/dist/ort.wasm.bundle.min.mjs node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm \
    lesionnet/app/static/vendor/ort/
else
  echo "npm not found: the page's on-device mode stays off (install Node.js 18+ and re-run scripts/setup.sh)" >&2
fi
