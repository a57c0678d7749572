"""The prepared GPU script (bench/gpu.sh, bench/gpu_fast_path.py) is meant for a CUDA machine; here its
--dry-run runs every section through the real service on the built-in tiny models on CPU, and must
give one JSON line per section without an error (fp8 refused, as the service refuses it on a CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_fast_path

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_dry_run_gives_one_line_per_section(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "gpu_fast_path.jsonl").read_text().splitlines()]
    sections = {line["section"]: line for line in lines}
    assert list(sections) == list(gpu_fast_path.SECTIONS)
    assert all(line["dry_run"] is True and "error" not in line for line in lines), lines

    latency = sections["klein_latency"]["variants"]
    for name in ("eager", "compiled"):
        assert latency[name]["raw_png_s"] > 0 and latency[name]["json_s"] > 0
    assert latency["compiled"]["speed_modes"]["warmed"] == ["64x64x1"]
    assert "SD_QUANTIZE=fp8 needs an NVIDIA GPU" in latency["compiled_fp8"]["refused"]
    assert "skipped" in sections["fp8_vs_bf16"] and "skipped" in sections["gpu_idle"]
    assert sections["klein_throughput"]["clients"] == 8 and sections["klein_throughput"]["service_vs_plain"] > 0
    for family, scope in (("sd15", "whole UNet2DConditionModel"), ("sdxl", "UNet2DConditionModel repeated blocks")):
        assert sections[family]["speed_modes"]["compile_scope"].startswith(scope)


def test_usage_is_refused() -> None:
    done = subprocess.run(["bash", "bench/gpu.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr
