# syntax=docker/dockerfile:1
# imagegen: the image generation service on port 7860 (see docs/operations.md).
#
#   docker build -t imagegen:cuda .                          NVIDIA GPU (the default)
#   docker build --build-arg VARIANT=cpu -t imagegen:cpu .   CPU only: no CUDA libraries at all
#
# VARIANT picks the base image and the PyTorch wheel index; both variants install the same torch
# version and the service's `local` extra (diffusers, transformers...). TORCH_INDEX_URL overrides
# the index (e.g. another CUDA build: https://download.pytorch.org/whl/cu126).
ARG VARIANT=cuda

# The CUDA "base" flavour holds what the NVIDIA container toolkit needs to hand the GPU in, and no
# CUDA libraries: PyTorch's CUDA wheels bring their own (a "runtime" image would add a second copy
# of several GB).
FROM nvidia/cuda:12.8.1-base-ubuntu24.04 AS base-cuda
ENV TORCH_INDEX_URL_DEFAULT=https://download.pytorch.org/whl/cu128
# Ubuntu's python3 for this release: the base image tag fixes it; apt pins would break on every update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# CPU: the CPU wheel index only, so that no multi-GB CUDA build of torch can be pulled in.
FROM python:3.12-slim-bookworm AS base-cpu
ENV TORCH_INDEX_URL_DEFAULT=https://download.pytorch.org/whl/cpu

# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# torch first, from its own index and pinned: the `local` extra below then finds it installed and
# never resolves an open-ended torch from PyPI (which is a CUDA build).
RUN python3 -m venv /opt/venv \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL:-$TORCH_INDEX_URL_DEFAULT}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
# Every dependency of imagegen and of its `local` extra is pinned (==) in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[local]" \
    && python -c "import imagegen.cli, diffusers, torch; print('torch', torch.__version__)"

# A user of its own (uid 10001). The folders exist in the image, owned by that user, so Docker
# copies that ownership into new named volumes mounted on them: the service can write there.
RUN groupadd --system --gid 10001 imagegen \
    && useradd --system --uid 10001 --gid imagegen --home-dir /app --no-create-home --shell /usr/sbin/nologin imagegen \
    && mkdir -p /app/models /app/outputs /app/data \
    && chown imagegen:imagegen /app/models /app/outputs /app/data

# The .env.example defaults (./models, ./outputs, ./data) resolve to the same folders from /app.
ENV SD_HOST=0.0.0.0 \
    SD_PORT=7860 \
    SD_MODEL_DIR=/app/models \
    SD_OUTPUT_DIR=/app/outputs \
    SD_DATA_DIR=/app/data \
    HF_HOME=/app/models/.hf-home

# Numeric, so that a runtime can check it is not root (Kubernetes' runAsNonRoot) without /etc/passwd.
USER 10001:10001
EXPOSE 7860

# /health is 503 while the model loads. The first start downloads it (SD 2.1: about 5 GB), so the
# start period is long; `imagegen health` needs no curl and exits 0 only when the service is ready.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["imagegen", "health", "--quiet", "--timeout", "8"]

# SIGTERM drains: new jobs get 503, running ones get SD_SHUTDOWN_GRACE seconds, queued ones are kept.
CMD ["imagegen", "serve"]
