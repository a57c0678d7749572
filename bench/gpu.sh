#!/usr/bin/env bash
# The prepared GPU run (one CUDA machine, no network, about 5 minutes on an H100/H200):
#   1. bench/gpu_flux.py     FLUX.2 klein 4B-sized transformer at 1024x1024 bf16: step rate through
#                            the service path vs plain diffusers, peak GPU memory
#   2. bench/gpu_service.py  full-size SD 1.5, SDXL and klein denoisers (random weights) through the
#                            HTTP service vs plain diffusers: images/s at batch 1 and 4, peak memory
# Results: one JSON line per figure on stdout and in $OUT (or bench/results/gpu/).
#
# The machine needs torch with CUDA, transformers and safetensors; what it lacks travels as wheels in
# .whl/ (prepare them here, where pip reaches PyPI):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 \
#     pydantic-settings==2.16.3 uvicorn==0.54.0 annotated-doc annotated-types typing-inspection \
#     python-dotenv importlib_metadata zipp typing_extensions "opentelemetry-api>=1.44"
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results/gpu}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
timeout 240 python3 bench/gpu_flux.py | tee "$out/gpu_flux.json"
timeout 420 python3 bench/gpu_service.py --runs 3 --out "$out/gpu_service.jsonl"
