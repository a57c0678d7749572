"""Load: 64 concurrent clients x 20 requests each against the fake backend, over real HTTP.

Threats: Fooocus #2049, dify PR #2818, vllm-omni #1080 (results delivered to the wrong client, or
never). Zero lost, zero swapped (each image is checked against its own prompt and seed), zero 5xx.
/health keeps answering throughout; its p99 is a benchmark figure (`make bench`, bench_load), not a
timed assertion here."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Callable

import httpx
import pytest
from PIL import Image

from tests.support.fake_backend import expected_pixels, seed_of

pytestmark = pytest.mark.slow

CLIENTS = 64
REQUESTS = 20


def test_64_clients_x_20_requests_none_lost_none_swapped(serve: Callable[..., httpx.Client], fake_factory) -> None:
    factories, holder = fake_factory(step_delay=0.001, max_batch=8)
    client = serve(factories=factories, default_backend="fake", max_queue=CLIENTS * 2, max_batch=8)
    url = str(client.base_url)

    async def one_client(http: httpx.AsyncClient, index: int) -> list[tuple[str, int, httpx.Response]]:
        answers = []
        for round_ in range(REQUESTS):
            prompt, seed = f"client {index} round {round_}", index * 1000 + round_
            response = await http.post("/api/txt2img", json={"prompt": prompt, "seed": seed, "width": 32, "height": 32})
            answers.append((prompt, seed, response))
        return answers

    async def probe_health(http: httpx.AsyncClient, stop: asyncio.Event) -> list[tuple[float, int]]:
        samples = []
        while not stop.is_set():
            started = time.perf_counter()
            response = await http.get("/health")
            samples.append((time.perf_counter() - started, response.status_code))
            await asyncio.sleep(0.02)
        return samples

    async def run() -> tuple[list[list[tuple[str, int, httpx.Response]]], list[tuple[float, int]]]:
        limits = httpx.Limits(max_connections=CLIENTS + 4, max_keepalive_connections=CLIENTS + 4)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            stop = asyncio.Event()
            prober = asyncio.create_task(probe_health(http, stop))
            results = await asyncio.gather(*(one_client(http, index) for index in range(CLIENTS)))
            stop.set()
            return results, await prober

    results, health = asyncio.run(run())
    answers = [answer for per_client in results for answer in per_client]
    assert len(answers) == CLIENTS * REQUESTS
    statuses = [response.status_code for _, _, response in answers]
    assert statuses.count(200) == len(answers), {code: statuses.count(code) for code in set(statuses)}
    job_ids = set()
    for prompt, seed, response in answers:
        body = response.json()
        job_ids.add(body["id"])
        (image,) = body["images"]
        assert image["seed"] == seed
        pixels = Image.open(io.BytesIO(base64.b64decode(image["b64"])))
        assert seed_of(pixels) == seed, "an image reached the wrong client"
        assert pixels.tobytes() == expected_pixels(prompt, seed, 32, 32).tobytes()
    assert len(job_ids) == CLIENTS * REQUESTS
    assert health and all(status == 200 for _, status in health)
    latencies = sorted(seconds for seconds, _ in health)
    print(
        f"/health during load: {len(latencies)} probes, p99 {latencies[int(len(latencies) * 0.99) - 1] * 1000:.1f} ms"
    )
    assert sum(len(call) for call in holder["backend"].calls) == CLIENTS * REQUESTS
