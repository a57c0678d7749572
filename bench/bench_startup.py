"""Start-up figures of the service core: `imagegen --help` time (it must not import torch), cold
start to ready with the built-in tiny-sd model (first start builds it, later starts load it), and
the server's RSS idle and after a request."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.support.process import SERVE, ServiceProcess


def _help_seconds() -> list[float]:
    times = []
    for _ in range(5):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "imagegen.cli", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times


def _baseline_python_seconds() -> float:
    times = []
    for _ in range(5):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run() -> list[dict]:
    rows = []
    helps = _help_seconds()
    bare = _baseline_python_seconds()
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, imagegen.cli, imagegen.main; print('torch' in sys.modules)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    rows.append(
        {
            "metric": "imagegen --help",
            "value": statistics.median(helps) * 1000,
            "unit": "ms",
            "target": "well under 1 s, no torch",
            "met": statistics.median(helps) < 1.0 and imported == "False",
            "detail": f"median of 5; a bare `python -c pass` takes {bare * 1000:.0f} ms here; torch imported: {imported}",
        }
    )
    model_dir = Path(tempfile.mkdtemp(prefix="imagegen-bench-models-"))
    for label in ("first start (builds tiny-sd)", "cold start to ready (tiny-sd)"):
        with ServiceProcess(
            command=SERVE, ready_timeout=600, SD_MODEL_DIR=str(model_dir), SD_MODEL_ID="tiny-sd"
        ) as service:
            ready = service.ready_seconds
            idle = service.rss_bytes()
            with httpx.Client(base_url=service.url, timeout=60) as client:
                assert client.post("/api/txt2img", json={"prompt": "a fox", "seed": 1}).status_code == 200
                # The pipeline lives in the device process (SD_DEVICE_ISOLATION=process): its memory apart.
                device = client.get("/health").json()["backends"]["sd"]["memory"]["rss_bytes"]
            after = service.rss_bytes()
        rows.append(
            {
                "metric": label,
                "value": ready,
                "unit": "s",
                "target": None,
                "met": None,
                "detail": "process start to /health 200 (imports torch + diffusers, loads the pipeline)",
            }
        )
    rows.append(
        {
            "metric": "RSS idle (tiny-sd loaded)",
            "value": idle / 2**20,
            "unit": "MiB",
            "target": None,
            "met": None,
            "detail": f"the service process (no torch); the device process holding tiny-sd: {device / 2**20:.0f} MiB",
        }
    )
    rows.append(
        {
            "metric": "RSS after a request",
            "value": after / 2**20,
            "unit": "MiB",
            "target": None,
            "met": None,
            "detail": "one 64x64 image, 25 steps",
        }
    )
    return rows
