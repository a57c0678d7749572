"""Load: 64 concurrent clients x 20 requests against the service with the deterministic fake backend
(the service, the load generator and the /health prober each in their own process), as a bench:
the figures are the /health p99 latency under load (target < 100 ms), the error count and the
request throughput."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time

import httpx

from tests.support.process import ServiceProcess

CLIENTS, REQUESTS = 64, 20

_PROBE = r"""
import json, sys, time, httpx
url, seconds = sys.argv[1], float(sys.argv[2])
with httpx.Client(base_url=url, timeout=30) as client:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        status = client.get("/health").status_code
        print(json.dumps([time.perf_counter() - started, status]), flush=True)
        time.sleep(0.02)
"""


async def _load(url: str) -> tuple[int, int, float]:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def one(index: int) -> list[int]:
            codes = []
            for round_ in range(REQUESTS):
                response = await http.post(
                    "/api/txt2img",
                    json={"prompt": f"c{index} r{round_}", "seed": index * 1000 + round_, "width": 32, "height": 32},
                )
                codes.append(response.status_code)
            return codes

        started = time.perf_counter()
        codes = [code for per in await asyncio.gather(*(one(i) for i in range(CLIENTS))) for code in per]
        return codes.count(200), sum(code >= 500 for code in codes), time.perf_counter() - started


def run() -> list[dict]:
    service = ServiceProcess(SD_MAX_QUEUE=str(CLIENTS * 2), SD_MAX_BATCH="8", FAKE_STEP_DELAY="0.001")
    service.start()
    url = service.url
    try:
        probe = subprocess.Popen([sys.executable, "-c", _PROBE, url, "600"], stdout=subprocess.PIPE)
        time.sleep(0.5)
        ok, server_errors, seconds = asyncio.run(_load(url))
        probe.terminate()
        out, _ = probe.communicate(timeout=30)
    finally:
        service.stop()
    samples = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    latencies = sorted(seconds_ for seconds_, _ in samples)
    p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000 if latencies else float("nan")
    total = CLIENTS * REQUESTS
    return [
        {
            "metric": "/health p99 under 64x20 load",
            "value": p99,
            "unit": "ms",
            "target": "< 100",
            "met": p99 < 100,
            "detail": f"{len(latencies)} probes from their own process; median "
            f"{statistics.median(latencies) * 1000:.1f} ms"
            if latencies
            else "no probes",
        },
        {
            "metric": "requests answered 200",
            "value": ok,
            "unit": f"of {total}",
            "target": f"= {total}",
            "met": ok == total,
        },
        {"metric": "5xx answers", "value": server_errors, "unit": "", "target": "= 0", "met": server_errors == 0},
        {
            "metric": "throughput",
            "value": total / seconds,
            "unit": "req/s",
            "target": None,
            "met": None,
            "detail": f"{total} synchronous txt2img requests (32x32, fake backend) in {seconds:.1f} s",
        },
    ]
