"""The fast path on a CPU: what the service adds to a 1024x1024 image after generation, and the encoder.

Rows (issue 16's metric names):
- added_ms_raw_1024: sync POST /api/txt2img with `Accept: image/png`, median wall time minus the
  generation time (the fake backend's steps x step delay): encode, store, answer the bytes;
- added_ms_json_1024: the same answered as JSON with the image in base64;
- png_speedup_1024: Pillow's PNG at level 1 / the service's encoder (OutputStore.encode) on the same
  1024x1024 noise image, in this process;
- lane_utilisation: images/s with 4 clients x generation time, on a local backend whose pipeline
  sleeps like a GPU (bench/fast_path_lane.py; 1.0: the device never waited for the CPU).
The HTTP rows run the real service in its own process (tests/support/process.py) with the fake backend
(tests/support/fake_backend.py) whose "noise" prompt returns 1024x1024 random noise: the worst case for
PNG. With BENCH_BEFORE=<git ref> (e.g. the commit this branch started from) the same rows are measured
side by side against that ref's src/ in a second service process, alternating requests, and reported
as `*_before`; without it, only this checkout is measured.

Run: `python -m bench fast_path` (also part of `make bench`).
"""

from __future__ import annotations

import io
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from bench import fast_path_lane
from tests.support.process import ROOT, SERVE_FAKE, ServiceProcess

SIZE = 1024
STEPS = 4
STEP_DELAY = 0.025
GENERATION_S = STEPS * STEP_DELAY
REQUESTS = 15
BODY = {"prompt": "noise", "width": SIZE, "height": SIZE, "steps": STEPS, "output_format": "png"}


def _timed(function: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median seconds of `repeat` calls, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def photo_like(size: int = SIZE) -> Image.Image:
    """A real-looking render: smooth gradients and shapes, blurred, with a little grain."""
    import random

    from PIL import ImageChops, ImageDraw, ImageFilter

    gradient = Image.linear_gradient("L").resize((size, size))
    image = Image.merge("RGB", (gradient, gradient.rotate(90), Image.radial_gradient("L").resize((size, size))))
    draw = ImageDraw.Draw(image)
    chance = random.Random(1)
    for _ in range(60):
        x, y, extent = chance.randrange(size), chance.randrange(size), chance.randrange(20, 200)
        draw.ellipse((x, y, x + extent, y + extent), fill=tuple(chance.randrange(256) for _ in range(3)))
    image = image.filter(ImageFilter.GaussianBlur(6))
    grain = Image.effect_noise((size, size), 6).convert("RGB")
    return ImageChops.add(image, grain, 1, -128)


def _encoders() -> dict[str, Any]:
    from imagegen.storage.outputs import OutputStore

    meta = {"prompt": "noise", "seed": 1, "width": SIZE, "height": SIZE, "steps": STEPS}
    noise = Image.frombytes("RGB", (SIZE, SIZE), os.urandom(SIZE * SIZE * 3))
    found: dict[str, Any] = {}
    for name, image in (("noise", noise), ("photo", photo_like())):

        def pillow(image: Image.Image = image) -> bytes:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=1)
            return buffer.getvalue()

        def service(image: Image.Image = image) -> bytes:
            return OutputStore.encode(image, "png", meta)

        pillow_s, pillow_bytes = _timed(pillow, 5)
        service_s, service_bytes = _timed(service, 5)
        with Image.open(io.BytesIO(service_bytes)) as decoded:
            assert decoded.tobytes() == image.tobytes(), "the service's PNG does not decode to the same pixels"
        found[name] = {
            "pillow_ms": pillow_s * 1000,
            "service_ms": service_s * 1000,
            "pillow_bytes": len(pillow_bytes),
            "service_bytes": len(service_bytes),
        }
    return found


@contextmanager
def baseline_src(ref: str) -> Iterator[Path]:
    """src/ of `ref`, exported to a temporary folder (nothing in any worktree changes)."""
    with tempfile.TemporaryDirectory(prefix="bench-before-") as folder:
        archive = subprocess.run(["git", "archive", ref, "src"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        yield Path(folder) / "src"


def _service(folder: Path, src: Path | None) -> ServiceProcess:
    env = {"FAKE_STEP_DELAY": str(STEP_DELAY), "FAKE_MAX_BATCH": "1"}
    if src is not None:  # the baseline's code first; tests.support from this checkout
        env["PYTHONPATH"] = os.pathsep.join([str(src), str(ROOT)])
    return ServiceProcess(folder, command=SERVE_FAKE, **env)


def _request(client: httpx.Client, raw: bool, seed: int) -> float:
    headers = {"Accept": "image/png"} if raw else {}
    started = time.perf_counter()
    response = client.post("/api/txt2img", json={**BODY, "seed": seed}, headers=headers)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"service answered {response.status_code}: {response.text[:200]}")
    if raw:
        assert response.headers["content-type"] == "image/png" and len(response.content) > SIZE * SIZE * 3
    else:
        assert len(response.json()["images"][0]["b64"]) > SIZE * SIZE * 4
    return elapsed


def _http(before: str | None) -> dict[str, dict[str, list[float]]]:
    """{"after"/"before": {"raw"/"json": [seconds...]}}, requests alternating between the services."""
    work = Path(tempfile.mkdtemp(prefix="bench-fast-path-"))
    with ExitStack() as stack:
        services = {"after": _service(work / "after", None)}
        if before is not None:
            services["before"] = _service(work / "before", stack.enter_context(baseline_src(before)))
        clients: dict[str, httpx.Client] = {}
        for name, service in services.items():
            stack.enter_context(service)
            clients[name] = stack.enter_context(httpx.Client(base_url=service.url, timeout=60))
        for client in clients.values():
            for raw in (True, False):  # warm-up: connections, lazy imports, the noise buffer
                _request(client, raw, 0)
        found: dict[str, dict[str, list[float]]] = {name: {"raw": [], "json": []} for name in clients}
        for index in range(REQUESTS):
            for raw in (True, False):
                for name, client in clients.items():
                    found[name]["raw" if raw else "json"].append(_request(client, raw, 1 + index))
        return found


def _added_ms(samples: list[float]) -> float:
    return (statistics.median(samples) - GENERATION_S) * 1000


def run() -> list[dict[str, Any]]:
    before = os.environ.get("BENCH_BEFORE") or None
    load_before = os.getloadavg()[0]
    encoders = _encoders()
    http = _http(before)
    machine = f"{os.cpu_count()} CPU cores, 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    noise, photo = encoders["noise"], encoders["photo"]
    speedup = noise["pillow_ms"] / noise["service_ms"]
    rows: list[dict[str, Any]] = []
    for kind, target in (("raw", 40.0), ("json", 80.0)):
        added = _added_ms(http["after"][kind])
        what = "Accept: image/png (the bytes as encoded)" if kind == "raw" else "JSON with the image in base64"
        rows.append(
            {
                "metric": f"added_ms_{kind}_1024",
                "value": added,
                "unit": "ms",
                "target": f"<= {target:g} ms",
                "met": added <= target,
                "detail": (
                    f"sync /api/txt2img, {what}, 1024x1024 noise from the fake backend ({STEPS} steps x "
                    f"{STEP_DELAY * 1000:g} ms = {GENERATION_S * 1000:g} ms generation, subtracted); median of "
                    f"{REQUESTS}; {machine}"
                ),
            }
        )
        if "before" in http:
            rows.append(
                {
                    "metric": f"added_ms_{kind}_1024_before",
                    "value": _added_ms(http["before"][kind]),
                    "unit": "ms",
                    "target": None,
                    "met": None,
                    "detail": f"the same against src/ of {before}, requests alternating with the row above",
                }
            )
    rows.append(
        {
            "metric": "png_speedup_1024",
            "value": speedup,
            "unit": "x",
            "target": ">= 4x",
            "met": speedup >= 4,
            "detail": (
                f"Pillow PNG level 1 {noise['pillow_ms']:.0f} ms / the service's encoder {noise['service_ms']:.1f} "
                f"ms on 1024x1024 RGB noise (median of 5; files {noise['pillow_bytes']:,} vs "
                f"{noise['service_bytes']:,} bytes); on a photo-like render {photo['pillow_ms']:.0f} ms vs "
                f"{photo['service_ms']:.1f} ms, files {photo['pillow_bytes']:,} vs {photo['service_bytes']:,} bytes"
            ),
        }
    )
    # The device path's row (bench/fast_path_lane.py): images/s with 4 clients x generation time.
    rows.append(fast_path_lane.lane_utilisation())
    return rows
