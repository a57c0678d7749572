"""flux-api: what the service adds to a BFL generation, and how 24 concurrent requests scale.

Three processes, as in production: the fake BFL server (fixed 1 s generation), the service with its
default flux-api settings (polling included), and this load generator. Side by side in one run:
- direct: a bare BFL client (submit, poll every 10 ms, download) against the fake; this is the fake's
  own time for a request, with next to nothing added;
- service: the same generation through POST /api/txt2img (HTTP edge, job engine, backend, polling,
  download, decode, encode, store, response).
Requests alternate direct/service so drift affects both alike. Overhead = median(service - direct).

With BENCH_BEFORE=<git ref> the 24-concurrent figure is also measured for that ref's src/ (a second
service process, the same fake settings) in the same run, rounds alternating with this checkout's, and
reported as `concurrent_24_vs_one_before`: how a change moved the figure on the same machine at the
same moment (BENCH_FLUX_API_ONLY_BEFORE_AFTER=1: only that figure, a few minutes shorter).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.bench_fast_path import baseline_src
from tests.support.process import FAKE_BFL, ROOT, SERVE, ServiceProcess

KEY = "bfl_bench-key"
GENERATION_S = 1.0
PAIRS = 10
CONCURRENT = 24
PROMPT = "a lighthouse at dawn, oil painting"


@contextmanager
def _processes(report_progress: bool, src: Path | None = None) -> Iterator[tuple[str, str]]:
    """(fake BFL URL, service URL), each in its own process; the service runs `src` when given."""
    work = Path(tempfile.mkdtemp(prefix="bench-flux-api-"))
    code = {} if src is None else {"PYTHONPATH": os.pathsep.join([str(src), str(ROOT)])}
    options = ["--key", KEY, "--generation-time", str(GENERATION_S), "--max-active", "24"]
    if not report_progress:
        options.append("--no-progress")
    fake = ServiceProcess(work / "bfl", command=(*FAKE_BFL, *options), health="/v1/credits", headers={"x-key": KEY})
    with fake:
        service = ServiceProcess(
            work,
            command=SERVE,
            SD_DEFAULT_BACKEND="flux-api",
            SD_BFL_API_URL=fake.url,
            SD_BFL_API_KEY=KEY,
            **code,
        )
        with service:
            yield fake.url, service.url


async def _direct(client: httpx.AsyncClient, fake_url: str, seed: int) -> float:
    started = time.perf_counter()
    submitted = await client.post(
        f"{fake_url}/v1/flux-2-klein-4b",
        headers={"x-key": KEY},
        json={"prompt": PROMPT, "seed": seed, "width": 1024, "height": 1024, "output_format": "png"},
    )
    polling_url = submitted.json()["polling_url"]
    while True:
        await asyncio.sleep(0.01)
        body = (await client.get(polling_url, headers={"x-key": KEY})).json()
        if body["status"] == "Ready":
            break
    image = await client.get(body["result"]["sample"])
    assert image.status_code == 200
    return time.perf_counter() - started


async def _service(client: httpx.AsyncClient, service_url: str, seed: int, size: int = 1024) -> float:
    started = time.perf_counter()
    response = await client.post(
        f"{service_url}/api/txt2img",
        json={
            "prompt": PROMPT,
            "backend": "flux-api",
            "seed": seed,
            "width": size,
            "height": size,
        },
    )
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"service answered {response.status_code}: {response.text[:200]}")
    return elapsed


async def _measure(report_progress: bool, pairs: int, throughput: bool) -> dict[str, Any]:
    with _processes(report_progress) as (fake_url, service_url):
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64, keepalive_expiry=2.0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            await _service(client, service_url, 0)  # warm-up: first connections, lazy imports
            await _direct(client, fake_url, 0)
            direct, service = [], []
            for index in range(pairs):
                direct.append(await _direct(client, fake_url, 100 + index))
                service.append(await _service(client, service_url, 200 + index))
            result: dict[str, Any] = {"direct": direct, "service": service}
            if throughput:
                single = [await _service(client, service_url, 300 + index) for index in range(3)]
                # One uncounted concurrent round each: the pools' first 24 connections (client to
                # service, service to fake) and the fake's render threads start here, not in a round.
                await asyncio.gather(*(_direct(client, fake_url, 500 + index) for index in range(CONCURRENT)))
                await asyncio.gather(*(_service(client, service_url, 600 + index) for index in range(CONCURRENT)))
                walls, direct_walls = [], []
                for round_ in range(3):
                    # The fake's own scaling first (same machine, same moment), then the service's.
                    started = time.perf_counter()
                    await asyncio.gather(
                        *(_direct(client, fake_url, 10_000 * (round_ + 1) + index) for index in range(CONCURRENT))
                    )
                    direct_walls.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    await asyncio.gather(
                        *(_service(client, service_url, 1000 * (round_ + 1) + index) for index in range(CONCURRENT))
                    )
                    walls.append(time.perf_counter() - started)
                # The same at 256x256: image decode/encode is then negligible, which separates the
                # service's own scaling from per-pixel CPU work on a small machine.
                small_single = [await _service(client, service_url, 400 + index, 256) for index in range(3)]
                small_walls = []
                for round_ in range(3):
                    started = time.perf_counter()
                    await asyncio.gather(
                        *(
                            _service(client, service_url, 5000 * (round_ + 1) + index, 256)
                            for index in range(CONCURRENT)
                        )
                    )
                    small_walls.append(time.perf_counter() - started)
                result.update(
                    single=single,
                    walls=walls,
                    direct_walls=direct_walls,
                    small_single=small_single,
                    small_walls=small_walls,
                )
            return result


#: rounds of the side-by-side figure (each: one request alone, then 24 at once, per service)
ROUNDS = 5


async def _concurrent_before_after(before: Path) -> dict[str, list[float]]:
    """24 concurrent / one at 1024x1024 for this checkout and for `before`, rounds alternating."""
    with _processes(True) as (fake_after, after_url), _processes(True, before) as (fake_before, before_url):
        del fake_after, fake_before
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64, keepalive_expiry=2.0)
        found: dict[str, list[float]] = {"after": [], "before": [], "after_one": [], "before_one": []}
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            for url in (after_url, before_url):
                await _service(client, url, 0)
                # uncounted: the first 24 connections of each pool and the fake's render threads
                await asyncio.gather(*(_service(client, url, 600 + index) for index in range(CONCURRENT)))
            for round_ in range(ROUNDS):
                for name, url in (("after", after_url), ("before", before_url)):
                    found[f"{name}_one"].append(await _service(client, url, 700 + round_))
                    started = time.perf_counter()
                    await asyncio.gather(
                        *(_service(client, url, 9000 * (round_ + 1) + index) for index in range(CONCURRENT))
                    )
                    found[name].append(time.perf_counter() - started)
        return found


def _before_rows(ref: str) -> list[dict[str, Any]]:
    with baseline_src(ref) as src:
        found = asyncio.run(_concurrent_before_after(src))
    rows = []
    for name in ("after", "before"):
        ratio = statistics.median(found[name]) / statistics.median(found[f"{name}_one"])
        rows.append(
            {
                "metric": f"concurrent_24_vs_one_{name}",
                "value": ratio,
                "unit": "x",
                "target": "<= 1.3x" if name == "after" else None,
                "met": ratio <= 1.3 if name == "after" else None,
                "detail": (
                    f"{'this checkout' if name == 'after' else 'src/ of ' + ref}: {CONCURRENT} concurrent "
                    f"1024x1024 (rounds {', '.join(f'{wall:.2f}' for wall in found[name])} s) / one alone "
                    f"({', '.join(f'{wall:.2f}' for wall in found[name + '_one'])} s); rounds alternate between "
                    "the two services, each with its own fake BFL"
                ),
            }
        )
    return rows


def run() -> list[dict[str, Any]]:
    if os.environ.get("BENCH_FLUX_API_ONLY_BEFORE_AFTER") and os.environ.get("BENCH_BEFORE"):
        return _before_rows(os.environ["BENCH_BEFORE"])  # just the side-by-side figure
    load_before = os.getloadavg()[0]
    measured = asyncio.run(_measure(report_progress=True, pairs=PAIRS, throughput=True))
    blind = asyncio.run(_measure(report_progress=False, pairs=5, throughput=False))

    direct_ms = statistics.median(measured["direct"]) * 1000
    service_ms = statistics.median(measured["service"]) * 1000
    added = statistics.median([(s - d) * 1000 for s, d in zip(measured["service"], measured["direct"], strict=True)])
    blind_added = statistics.median([(s - d) * 1000 for s, d in zip(blind["service"], blind["direct"], strict=True)])
    single = statistics.median(measured["single"])
    ratio = statistics.median(measured["walls"]) / single
    direct_ratio = statistics.median(measured["direct_walls"]) / statistics.median(measured["direct"])
    small_single = statistics.median(measured["small_single"])
    small_ratio = statistics.median(measured["small_walls"]) / small_single
    # Other work on the machine skews every figure here: say how busy it was.
    machine = f"{os.cpu_count()} CPU cores, 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    return [
        {
            "metric": "overhead_median",
            "value": added,
            "unit": "ms",
            "target": "< 150 ms",
            "met": added < 150,
            "detail": (
                f"median(service - direct) over {PAIRS} alternating pairs, fake generation {GENERATION_S:g} s, "
                f"1024x1024 PNG; direct median {direct_ms:.0f} ms, service median {service_ms:.0f} ms; default "
                "SD_BFL_POLL_* settings, the fake reports progress so polling aims at the finish"
            ),
        },
        {
            "metric": "overhead_median_no_progress",
            "value": blind_added,
            "unit": "ms",
            "target": None,
            "met": None,
            "detail": (
                "the same with the fake reporting progress: null (5 pairs): polling falls back to the backoff "
                "schedule alone (0.5 s, x1.5, to 2 s), which is most of this figure"
            ),
        },
        {
            "metric": "concurrent_24_vs_one",
            "value": ratio,
            "unit": "x",
            "target": "<= 1.3x",
            "met": ratio <= 1.3,
            "detail": (
                f"wall time for {CONCURRENT} concurrent /api/txt2img (median of 3 rounds: "
                f"{', '.join(f'{wall:.2f}' for wall in measured['walls'])} s) / one request alone "
                f"(median {single:.2f} s); the fake, the service and the client share {machine}"
            ),
        },
        {
            "metric": "direct_24_vs_one",
            "value": direct_ratio,
            "unit": "x",
            "target": None,
            "met": None,
            "detail": (
                f"reference: the same {CONCURRENT} concurrent generations sent straight to the fake (rounds "
                f"{', '.join(f'{wall:.2f}' for wall in measured['direct_walls'])} s) / one direct request"
            ),
        },
        {
            "metric": "concurrent_24_vs_one_256px",
            "value": small_ratio,
            "unit": "x",
            "target": None,
            "met": None,
            "detail": (
                f"diagnostic: {CONCURRENT} concurrent at 256x256 (rounds "
                f"{', '.join(f'{wall:.2f}' for wall in measured['small_walls'])} s) / one alone "
                f"({small_single:.2f} s): the service's own scaling without per-pixel CPU work"
            ),
        },
    ] + (_before_rows(os.environ["BENCH_BEFORE"]) if os.environ.get("BENCH_BEFORE") else [])


if __name__ == "__main__":
    for row in run():
        print(row)
