# LesionNet: training, evaluation and the web app in one image.
#
# CPU (default; torch from PyTorch's CPU index, no CUDA libraries):
#   docker build -t lesionnet .
# GPU: PyPI's Linux torch wheels bring their own CUDA libraries (the host needs the NVIDIA driver and the container
# toolkit; run with --gpus all), so the slim base works. A CUDA base image (BASE_IMAGE) works too; when it has no
# Python, the distribution's python3 is installed:
#   docker build -t lesionnet:gpu --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#   docker build -t lesionnet:cuda --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
#       --build-arg BASE_IMAGE=nvidia/cuda:<tag>-cudnn-runtime-ubuntu24.04 .
#
# Run (runs write to /app/logs as uid 10001: mount a folder it may write; the default command trains on the
# embedded sample):
#   docker run --rm -v "$PWD/logs:/app/logs" lesionnet
#   docker run --rm --gpus all -v /data/HAM10000:/data:ro -v "$PWD/logs:/app/logs" lesionnet:gpu \
#       python train.py data.root=/data trainer=gpu
#   docker run --rm -v /data/HAM10000:/data:ro -v "$PWD/logs:/app/logs" lesionnet \
#       python evaluate.py ckpt=logs/train/runs/<run>
#   docker run --rm -p 8000:8000 -v /data/HAM10000:/data:ro -v "$PWD/logs:/app/logs" lesionnet \
#       lesionnet serve ckpt=logs/train/runs/<run> host=0.0.0.0
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python from the distribution only when the base has none (CUDA bases); its version depends on the base.
# hadolint ignore=DL3008
RUN if ! command -v python3 > /dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 lesionnet

WORKDIR /app
# torch first, in its own layer, at the pinned version (constraints.txt) from TORCH_INDEX_URL.
COPY constraints.txt ./
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" -c constraints.txt torch torchvision

# The project (its Hydra configs are package data in lesionnet/conf), every other dependency pinned by constraints.txt.
COPY pyproject.toml README.md train.py evaluate.py ./
COPY lesionnet ./lesionnet
RUN pip install --no-cache-dir -c constraints.txt -e ".[lite,app]" \
    && mkdir -p /app/logs \
    && chown lesionnet /app/logs

USER 10001
EXPOSE 8000
CMD ["python", "train.py"]
