"""Job engine benchmarks on the built-in tiny-sd model, each figure a ratio measured side by side:

- service overhead: synchronous /api/txt2img end to end vs the same diffusers pipeline call made
  directly in this process (same model, parameters and seeds; interleaved runs, medians);
- throughput: 8 concurrent clients vs the same 8 requests one after another (batching);
- /health p99 latency while the backend is saturated by 8 concurrent clients.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from tests.support.process import SERVE, ServiceProcess

RUNS = 20
PARAMS = {"width": 128, "height": 128, "steps": 20}  # the pipeline dominates, as with real models
SMALL = {"width": 64, "height": 64, "steps": 10}


def _direct_pipeline(model_dir: Path):  # type: ignore[no-untyped-def]
    import torch
    from diffusers import AutoPipelineForText2Image

    from imagegen.backends.local.tiny_models import ensure_builtin

    path = ensure_builtin(model_dir, "tiny-sd")
    pipe = AutoPipelineForText2Image.from_pretrained(path, local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)

    def call(seed: int) -> None:
        with torch.inference_mode():
            pipe(
                prompt="a lighthouse",
                num_inference_steps=PARAMS["steps"],
                width=PARAMS["width"],
                height=PARAMS["height"],
                generator=torch.Generator().manual_seed(seed),
            )

    return call


def run() -> list[dict]:
    model_dir = Path(tempfile.mkdtemp(prefix="imagegen-bench-models-"))
    direct = _direct_pipeline(model_dir)
    rows: list[dict] = []
    with (
        ServiceProcess(
            command=SERVE, ready_timeout=600, SD_MODEL_DIR=str(model_dir), SD_MODEL_ID="tiny-sd", SD_MAX_BATCH="8"
        ) as service,
        httpx.Client(base_url=service.url, timeout=120) as client,
    ):
        # Warm both paths once.
        direct(0)
        client.post("/api/txt2img", json={"prompt": "a lighthouse", "seed": 0, **PARAMS})
        direct_times, service_times = [], []
        for index in range(RUNS):
            started = time.perf_counter()
            direct(index)
            direct_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            response = client.post("/api/txt2img", json={"prompt": "a lighthouse", "seed": index, **PARAMS})
            service_times.append(time.perf_counter() - started)
            assert response.status_code == 200
        ratio = statistics.median(service_times) / statistics.median(direct_times)
        rows.append(
            {
                "metric": "service overhead (txt2img / direct call)",
                "value": ratio,
                "unit": "x",
                "target": "<= 1.05",
                "met": ratio <= 1.05,
                "detail": f"tiny-sd {PARAMS['width']}x{PARAMS['height']} {PARAMS['steps']} steps, median of {RUNS}: "
                f"service {statistics.median(service_times) * 1000:.1f} ms, direct "
                f"{statistics.median(direct_times) * 1000:.1f} ms (direct = pipe(...) with its safety "
                "checker; service adds HTTP, job store, checker, PNG encode+save, base64)",
            }
        )

        async def concurrent(n: int) -> float:
            async with httpx.AsyncClient(base_url=service.url, timeout=120) as http:
                started = time.perf_counter()
                responses = await asyncio.gather(
                    *(http.post("/api/txt2img", json={"prompt": f"c{i}", "seed": i, **SMALL}) for i in range(n))
                )
                assert all(r.status_code == 200 for r in responses)
                return time.perf_counter() - started

        sequential_times, concurrent_times = [], []
        for _ in range(3):
            started = time.perf_counter()
            for i in range(8):
                assert client.post("/api/txt2img", json={"prompt": f"s{i}", "seed": i, **SMALL}).status_code == 200
            sequential_times.append(time.perf_counter() - started)
            concurrent_times.append(asyncio.run(concurrent(8)))
        speedup = statistics.median(sequential_times) / statistics.median(concurrent_times)
        rows.append(
            {
                "metric": "throughput 8 concurrent / 8 sequential",
                "value": speedup,
                "unit": "x",
                "target": ">= 1.3",
                "met": speedup >= 1.3,
                "detail": f"tiny-sd {SMALL['width']}x{SMALL['height']} {SMALL['steps']} steps, SD_MAX_BATCH=8, "
                f"median of 3: sequential {statistics.median(sequential_times):.2f} s, "
                f"concurrent {statistics.median(concurrent_times):.2f} s",
            }
        )

        async def saturated_health() -> list[float]:
            latencies: list[float] = []
            stop = asyncio.Event()
            async with httpx.AsyncClient(base_url=service.url, timeout=120) as http:

                async def load(i: int) -> None:
                    while not stop.is_set():
                        await http.post("/api/txt2img", json={"prompt": f"load{i}", **SMALL})

                loaders = [asyncio.create_task(load(i)) for i in range(8)]
                await asyncio.sleep(1.0)
                async with httpx.AsyncClient(base_url=service.url, timeout=10) as probe:
                    for _ in range(300):
                        started = time.perf_counter()
                        await probe.get("/health")
                        latencies.append(time.perf_counter() - started)
                        await asyncio.sleep(0.01)
                stop.set()
                await asyncio.gather(*loaders)
            return latencies

        latencies = sorted(asyncio.run(saturated_health()))
        p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
        rows.append(
            {
                "metric": "/health p99 while saturated",
                "value": p99,
                "unit": "ms",
                "target": "< 50",
                "met": p99 < 50,
                "detail": f"{len(latencies)} probes while 8 clients keep the backend busy; median "
                f"{statistics.median(latencies) * 1000:.1f} ms",
            }
        )
    return rows
