#!/usr/bin/env bash
# The prepared GPU run (one CUDA machine, no network, <= 8 minutes on an H200; docs/benchmarks.md "GPU"):
#   bench/gpu_fast_path.py   the fast path of issue 16, one JSON line per section in $OUT/gpu_fast_path.jsonl:
#                            klein_latency (eager / compiled / compiled+fp8, raw PNG and JSON), fp8_vs_bf16,
#                            klein_throughput (8 clients vs plain diffusers), gpu_idle (NVML), sd15 (compiled
#                            step rate), sdxl (1024x1024)
#   --all                    also the earlier scripts: bench/gpu_flux.py (klein step rate, service vs plain)
#                            and bench/gpu_service.py (images/s at batch 1 and 4 per family): +5 minutes
#   --dry-run                every section on the built-in tiny models on CPU (what tests/ops runs)
# Results: $OUT (or bench/results/gpu/).
#
# The machine needs torch with CUDA, transformers and safetensors; what it lacks travels as wheels in
# .whl/ (prepare them here, where pip reaches PyPI; torchao for SD_QUANTIZE=fp8, nvidia-ml-py for NVML):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 \
#     pydantic-settings==2.16.3 uvicorn==0.54.0 annotated-doc annotated-types typing-inspection \
#     python-dotenv importlib_metadata zipp typing_extensions "opentelemetry-api>=1.44" \
#     torchao==0.18.0 nvidia-ml-py==13.615.71
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results/gpu}"
mkdir -p "$out"
all=0 dry=()
for arg in "$@"; do
  case "$arg" in
    --all) all=1 ;;
    --dry-run) dry=(--dry-run) ;;
    *) echo "usage: bench/gpu.sh [--all] [--dry-run]" >&2; exit 2 ;;
  esac
done
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
py="${PYTHON:-python3}"
if [ ${#dry[@]} -eq 0 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee "$out/device.txt"
fi
# Each group of sections has its own time limit: one that hangs cannot eat the others' time.
timeout 300 "$py" bench/gpu_fast_path.py "${dry[@]}" --out "$out" \
  --sections klein_latency fp8_vs_bf16 klein_throughput gpu_idle || echo '{"section": "klein", "error": "timed out or crashed"}' >>"$out/gpu_fast_path.jsonl"
timeout 180 "$py" bench/gpu_fast_path.py "${dry[@]}" --out "$out" \
  --sections sd15 sdxl || echo '{"section": "sd", "error": "timed out or crashed"}' >>"$out/gpu_fast_path.jsonl"
if [ "$all" = 1 ]; then
  timeout 240 "$py" bench/gpu_flux.py "${dry[@]}" | tee "$out/gpu_flux.json"
  timeout 420 "$py" bench/gpu_service.py "${dry[@]}" --runs 3 --out "$out/gpu_service.jsonl"
fi
