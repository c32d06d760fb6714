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
