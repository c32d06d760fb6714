#!/usr/bin/env bash
# The GPU check (issue 13, item 4), as is on a machine with one CUDA GPU, from a bare checkout: training img/s of the
# seed's networks at their native input size (synthetic batches, pretrained=false, no download) in fp32, bf16-mixed,
# bf16-mixed + channels_last (+ torch.compile for the baseline and Lite0), plus the baseline under 1-GPU DDP; at most
# 8 minutes (--budget-s 480; ~4-6 estimated, not yet run on a GPU). Prints the table and writes it between the
# gpu-check markers of docs/PERFORMANCE.md; keeps the JSON, the table and the log in logs/gpu_check/, and copies them
# with docs/PERFORMANCE.md to "$OUT" when that is set (the device tool brings back what is written there).
#
#   bash bench/gpu_check.sh                    # extra options go to bench/train_throughput.py, e.g. --budget-s 300
#
# Python: $PYTHON, else .venv/bin/python, else python3. Wheels in .whl/ (for an image that has torch, lightning, timm
# and torchmetrics but not hydra-core, omegaconf or albumentations: bench/README.md lists them) are installed into
# /tmp/lesionnet-site first.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [ -z "$py" ]; then if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi; fi
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lesionnet-site .whl/*.whl
    export PYTHONPATH="/tmp/lesionnet-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$py" -c "import lesionnet.training, lesionnet.data.transforms"; then
    echo "gpu_check.sh: $py cannot import LesionNet's training stack (the error is above). Install it there" \
        "(pip install -e .) or put the missing packages' wheels in .whl/ (bench/README.md, 'The GPU check')." >&2
    exit 1
fi
mkdir -p logs/gpu_check
rm -f logs/gpu_check/gpu_check.json logs/gpu_check/gpu_check.md  # none left from an earlier run
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 GPU_CHECK_WRAPPER="bash bench/gpu_check.sh${*:+ $*}"
status=0
"$py" bench/train_throughput.py --gpu-check --json logs/gpu_check/gpu_check.json --table logs/gpu_check/gpu_check.md \
    "$@" 2>&1 | tee logs/gpu_check/gpu_check.log || status=$?
if [ -n "${OUT:-}" ]; then
    for f in logs/gpu_check/gpu_check.json logs/gpu_check/gpu_check.md logs/gpu_check/gpu_check.log docs/PERFORMANCE.md; do
        if [ -f "$f" ]; then cp "$f" "$OUT"/; fi
    done
fi
exit "$status"
