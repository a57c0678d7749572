"""What running the local backends in a device process costs, and what it buys (docs/operations.md,
"The device process"), on the built-in tiny-sd model:

- the added latency per job: synchronous /api/txt2img with SD_DEVICE_ISOLATION=process vs thread,
  two services side by side, interleaved runs, medians; and what one 1024x1024 image costs to cross;
- the start of a device process: until it answers, and until tiny-sd is loaded in it; the fork
  server's first start (it imports torch and diffusers), later starts (forks), and spawn (what macOS
  uses: every start imports torch again);
- recovery from a wedging request: a tiny-sd call at 1024x1024, each step of which takes minutes on
  this CPU, with SD_JOB_TIMEOUT=3, then the time until the next small request succeeds (a client
  retrying at once when answered 503/504).

`python -m bench isolation` runs them all. The wedge alone, in a thread (it then lasts as long as the
wedged call) or against another checkout's code (e.g. today's main, exported to a folder):
`python -m bench.bench_isolation wedge --isolation thread`, `... wedge --src /path/to/checkout/src`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.process import ROOT, SERVE, ServiceProcess

RUNS = 20
SMALL = {"width": 64, "height": 64, "steps": 10}
#: minutes of work for tiny-sd on this 2-core CPU: one step at 1024x1024 takes about 4 minutes here, and a
#: pipeline checks for a cancel only between steps
WEDGE = {"width": 1024, "height": 1024, "steps": 2}
WEDGE_TIMEOUT = "3"
FORK_STARTS = 5
SPAWN_STARTS = 3


def _service(model_dir: Path, isolation: str | None, **env: str) -> ServiceProcess:
    settings = {"SD_MODEL_DIR": str(model_dir), "SD_MODEL_ID": "tiny-sd", "SD_MAX_BATCH": "1", **env}
    if isolation is not None:
        settings["SD_DEVICE_ISOLATION"] = isolation
    return ServiceProcess(command=SERVE, ready_timeout=600, **settings)


def _latency(model_dir: Path) -> dict[str, Any]:
    with _service(model_dir, "process") as isolated, _service(model_dir, "thread") as threaded:
        clients = {"process": isolated.client, "thread": threaded.client}
        times: dict[str, list[float]] = {"process": [], "thread": []}
        for client in clients.values():
            assert client is not None
            assert client.post("/api/txt2img", json={"prompt": "warm", "seed": 0, **SMALL}).status_code == 200
        for index in range(RUNS):
            order = ("process", "thread") if index % 2 == 0 else ("thread", "process")
            for name in order:
                client = clients[name]
                assert client is not None
                started = time.perf_counter()
                response = client.post("/api/txt2img", json={"prompt": "a lighthouse", "seed": index, **SMALL})
                times[name].append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
    process, thread = statistics.median(times["process"]), statistics.median(times["thread"])
    return {
        "metric": "latency per job, process / thread",
        "value": process / thread,
        "unit": "x",
        "target": "<= 1.10",
        "met": process / thread <= 1.10,
        "detail": f"tiny-sd {SMALL['width']}x{SMALL['height']} {SMALL['steps']} steps, synchronous /api/txt2img, "
        f"median of {RUNS} interleaved: process {process * 1000:.1f} ms, thread {thread * 1000:.1f} ms "
        f"(+{(process - thread) * 1000:.1f} ms: pickled request, one message per step, raw pixels back)",
    }


def _transfer() -> dict[str, Any]:
    """One 1024x1024 RGB image as raw pixels through a pipe: pack, send, receive, unpack."""
    import multiprocessing
    import threading

    from PIL import Image

    from imagegen.backends.local.protocol import BatchResult, pack_images, unpack_images
    from imagegen.generation import GeneratedImage

    image = Image.effect_noise((1024, 1024), 64).convert("RGB")
    sender, receiver = multiprocessing.Pipe()
    times = []
    for _ in range(RUNS):
        received: list[Any] = []
        reader = threading.Thread(target=lambda into=received: into.append(receiver.recv()))
        reader.start()
        started = time.perf_counter()
        sender.send(BatchResult(1, pack_images([[GeneratedImage(seed=1, image=image)]])))
        reader.join()
        (back,) = unpack_images(received[0].images)
        times.append(time.perf_counter() - started)
        assert back[0].image is not None and back[0].image.size == (1024, 1024)
    median = statistics.median(times)
    return {
        "metric": "1024x1024 RGB image through the pipe",
        "value": median * 1000,
        "unit": "ms",
        "target": "< 50",
        "met": median < 0.05,
        "detail": f"3 MB of raw pixels: pack, pickle, send, receive, unpack; median of {RUNS}",
    }


async def _start_once(settings: Any, method: str) -> tuple[float, float]:
    """(seconds to the device process's first answer, seconds until tiny-sd is loaded in it)."""
    from imagegen.backends.registry import BackendRegistry

    registry = BackendRegistry.from_settings(settings)
    supervisor = registry.device_process
    assert supervisor is not None
    supervisor.method = method
    started = time.perf_counter()
    await supervisor.start(preload="sd")
    await supervisor.until_available()
    ready = time.perf_counter() - started
    while True:
        found = supervisor.report("sd")
        if found is not None and found[0].health.loaded:
            break
        await asyncio.sleep(0.005)
    loaded = time.perf_counter() - started
    await supervisor.close()
    return ready, loaded


def _starts(model_dir: Path) -> list[dict[str, Any]]:
    from imagegen.config import Settings

    folder = Path(tempfile.mkdtemp(prefix="imagegen-bench-starts-"))
    settings = Settings(
        _env_file=None,
        model_id="tiny-sd",
        model_dir=model_dir,
        output_dir=folder / "outputs",
        data_dir=folder / "data",
        log_level="warning",
    )
    cold = asyncio.run(_start_once(settings, "forkserver"))
    forks = [asyncio.run(_start_once(settings, "forkserver")) for _ in range(FORK_STARTS)]
    spawns = [asyncio.run(_start_once(settings, "spawn")) for _ in range(SPAWN_STARTS)]
    fork_ready, fork_loaded = (statistics.median(item[i] for item in forks) for i in (0, 1))
    spawn_ready, spawn_loaded = (statistics.median(item[i] for item in spawns) for i in (0, 1))
    return [
        {
            "metric": "device process start (fork server warm)",
            "value": fork_ready * 1000,
            "unit": "ms",
            "target": "< 1000",
            "met": fork_ready < 1.0,
            "detail": f"start to first answer, median of {FORK_STARTS}; to tiny-sd loaded {fork_loaded * 1000:.0f} ms. "
            f"The fork server's first start (it imports torch, diffusers, the pipelines): {cold[0]:.2f} s to "
            f"the first answer, {cold[1]:.2f} s to tiny-sd loaded",
        },
        {
            "metric": "device process start (spawn, macOS)",
            "value": spawn_loaded,
            "unit": "s",
            "target": None,
            "met": None,
            "detail": f"start to tiny-sd loaded, median of {SPAWN_STARTS} (first answer after {spawn_ready:.2f} s, "
            "then torch and diffusers are imported by the load); fork server warm: "
            f"{fork_loaded:.2f} s, so spawn / fork = {spawn_loaded / fork_loaded:.1f}x",
        },
    ]


def wedge_recovery(model_dir: Path, isolation: str | None, src: Path | None = None) -> dict[str, float]:
    """Seconds from a wedging request until a small request succeeds; `src`: run that checkout's code."""
    env = {"SD_JOB_TIMEOUT": WEDGE_TIMEOUT}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), str(ROOT)])
    with _service(model_dir, isolation, **env) as service:
        client = service.client
        assert client is not None
        started = time.perf_counter()
        wedged = client.post("/api/jobs", json={"prompt": "a wedge", "seed": 1, **WEDGE}).json()["id"]
        while client.get(f"/api/jobs/{wedged}").json()["status"] == "queued":
            time.sleep(0.01)
        attempts = 0
        with httpx.Client(base_url=service.url, timeout=1800) as caller:
            while True:
                attempts += 1
                response = caller.post("/api/txt2img", json={"prompt": "next", "seed": attempts, **SMALL})
                if response.status_code == 200:
                    break
                assert response.status_code in (503, 504), response.text
        recovered = time.perf_counter() - started
    return {"seconds": recovered, "attempts": attempts}


def _recovery(model_dir: Path) -> dict[str, Any]:
    process = wedge_recovery(model_dir, "process")
    return {
        "metric": "wedge to next small request",
        "value": process["seconds"],
        "unit": "s",
        "target": "< 15",
        "met": process["seconds"] < 15,
        "detail": f"tiny-sd {WEDGE['width']}x{WEDGE['height']} {WEDGE['steps']} steps (minutes per step here), "
        f"SD_JOB_TIMEOUT={WEDGE_TIMEOUT}: the deadline, SD_DEVICE_STOP_GRACE (5 s), a kill, a new device "
        f"process that loads tiny-sd, then the small request ({process['attempts']:.0f} attempt(s)). Without the "
        "device process: `python -m bench.bench_isolation wedge --isolation thread` (or --src for another checkout)",
    }


def run() -> list[dict[str, Any]]:
    model_dir = Path(tempfile.mkdtemp(prefix="imagegen-bench-models-"))
    rows = [_latency(model_dir), _transfer()]
    rows.extend(_starts(model_dir))
    rows.append(_recovery(model_dir))
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="wedge recovery: the wedging request, then small requests")
    parser.add_argument("what", choices=["wedge"])
    parser.add_argument("--isolation", choices=["process", "thread"], help="SD_DEVICE_ISOLATION (default: the default)")
    parser.add_argument("--src", type=Path, help="another checkout's src/ folder, e.g. today's main exported")
    args = parser.parse_args(argv)
    model_dir = Path(tempfile.mkdtemp(prefix="imagegen-bench-models-"))
    src = args.src.resolve() if args.src else None
    result = wedge_recovery(model_dir, args.isolation, src=src)
    print(
        f"wedge to next small request ({src or 'this checkout'}, isolation {args.isolation or 'default'}): "
        f"{result['seconds']:.1f} s, {result['attempts']:.0f} attempt(s) "
        f"(tiny-sd {WEDGE['width']}x{WEDGE['height']} {WEDGE['steps']} steps, SD_JOB_TIMEOUT={WEDGE_TIMEOUT})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
