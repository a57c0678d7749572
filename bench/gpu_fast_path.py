"""The fast path on one CUDA GPU (issue 16): one JSON line per section, random weights, no network.

    python bench/gpu_fast_path.py --out DIR                  # CUDA: every section (<= 8 min on an H200)
    python bench/gpu_fast_path.py --sections sd15 --out DIR  # some sections
    python bench/gpu_fast_path.py --dry-run --out DIR        # tiny models on CPU: checks the script

Sections (docs/benchmarks.md "GPU: the fast path" says what each line means):
  klein_latency     FLUX.2 [klein] 4B-sized, 4 steps, 1024x1024, one request at a time through HTTP,
                    raw (`Accept: image/png`) and JSON (base64), for the service eager, compiled
                    (SD_COMPILE=regional) and compiled + fp8 (SD_QUANTIZE=fp8). Target <= 0.40 s.
  fp8_vs_bf16       how far the compiled fp8 image is from the compiled bf16 one (same seed)
  klein_throughput  images/s of the service (eager, SD_MAX_BATCH=4) with 8 concurrent clients vs
                    plain diffusers calling `pipe(...)` one image after the other. Target >= 0.97.
  gpu_idle          GPU idle share under that saturation, from NVML's utilization samples. Target < 5 %.
  sd15              SD 1.5 512x512: denoising step rate of the compiled service (SD_COMPILE=full: CUDA
                    graphs) and of plain diffusers eager. Target >= 115 it/s.
  sdxl              SDXL 1024x1024: the same with SD_COMPILE=regional (full would compile for minutes)

Step rates subtract two step counts, (HIGH - LOW) / (t_HIGH - t_LOW), so text encoding, decoding
and the answer cancel out. Dry run: the built-in tiny models at 64x64 on CPU, torch.compile's
`eager` backend (traces, generates no kernel), no NVML; figures are meaningless, the flow is real
(fp8 is refused there, exactly as the service refuses it on a CPU).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT / "src", ROOT):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from bench.gpu_service import build_full, free, load_tiny, plain_call, sync  # noqa: E402 - after the path set-up

SECTIONS = ("klein_latency", "fp8_vs_bf16", "klein_throughput", "gpu_idle", "sd15", "sdxl")
TARGETS = {"klein_latency": 0.40, "klein_throughput": 0.97, "gpu_idle": 5.0, "sd15": 115.0}


class Run:
    """What the sections share: the mode, the work folder, the models built once, the figures."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.dry_run: bool = args.dry_run
        self.cuda = torch.cuda.is_available() and not self.dry_run
        self.work = Path(tempfile.mkdtemp(prefix="imagegen-fast-path-"))
        self.folders: dict[str, Path] = {}
        self.shared: dict[str, Any] = {}
        self.size = (
            {"klein": 64, "sd15": 64, "sdxl": 64} if self.dry_run else {"klein": 1024, "sd15": 512, "sdxl": 1024}
        )
        self.runs = 1 if self.dry_run else args.runs

    def model(self, family: str) -> tuple[Any | None, Path]:
        """(the pipeline in memory or None, its folder): full-size random weights, or a built-in tiny one."""
        import torch

        if family in self.folders:
            return None, self.folders[family]
        if self.dry_run:
            pipe, folder = load_tiny(family, self.work / "models")
        else:
            folder = self.work / family
            pipe = build_full(family, folder, torch.bfloat16 if family == "klein" else torch.float16)
        self.folders[family] = folder
        return pipe, folder

    def settings(self, family: str, **overrides: Any) -> Any:
        from imagegen.config import Settings

        folder = self.folders[family]
        size = self.size[family]
        values: dict[str, Any] = dict(
            host="127.0.0.1",
            model_dir=self.work / "models",
            output_dir=self.work / "outputs",
            data_dir=self.work / "data" / f"{family}-{time.monotonic_ns()}",
            model_id=str(folder) if family != "klein" else "tiny-sd",
            flux_model_id=str(folder),
            default_backend="flux-local" if family == "klein" else "sd",
            safety_checker=False,
            max_width=2048,
            max_height=2048,
            device="cuda" if self.cuda else "cpu",
            job_timeout=600,
            log_level="warning",
            max_loaded_pipelines=1,
            max_batch=1,
            compile_sizes=[f"{size}x{size}"],
            compile_backend="inductor" if self.cuda else "eager",
            preview_interval=0,
        )
        values.update(overrides)
        return Settings(_env_file=None, **values)


@contextmanager
def service(settings: Any) -> Iterator[Any]:
    """The real app under uvicorn on loopback; yields an httpx client once /health is 200 (after the
    load and the compile warm-up), or raises with /health's reason."""
    import httpx

    from imagegen.main import create_app
    from tests.support.server import LiveServer

    app = create_app(settings)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=600) as client:
        deadline = time.monotonic() + 600
        while (health := client.get("/health")).status_code != 200:
            backend = health.json()["backends"][settings.default_backend.value]
            if backend["state"] == "error" or time.monotonic() > deadline:
                raise RuntimeError(backend["reason"])
            time.sleep(0.05)
        yield client
    free(app)


def body_for(family: str, size: int, steps: int, seed: int = 0) -> dict[str, Any]:
    return {
        "prompt": "a lighthouse at dusk",
        "backend": "flux-local" if family == "klein" else "sd",
        "width": size,
        "height": size,
        "steps": steps,
        "seed": seed,
    }


def timed_post(client: Any, body: dict[str, Any], raw: bool) -> tuple[float, bytes]:
    headers = {"Accept": "image/png"} if raw else {}
    began = time.perf_counter()
    response = client.post("/api/txt2img", json=body, headers=headers)
    elapsed = time.perf_counter() - began
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
    if raw:
        return elapsed, response.content
    import base64

    return elapsed, base64.b64decode(response.json()["images"][0]["b64"])


# -- sections -----------------------------------------------------------------------------------------


def klein_latency(run: Run) -> dict[str, Any]:
    run.model("klein")
    size, steps = run.size["klein"], 4
    variants = {
        "eager": {},
        "compiled": {"compile": "regional"},
        "compiled_fp8": {"compile": "regional", "quantize": "fp8"},
    }
    result: dict[str, Any] = {}
    images: dict[str, bytes] = {}
    for name, modes in variants.items():
        started = time.perf_counter()
        try:
            with service(run.settings("klein", **modes)) as client:
                ready = time.perf_counter() - started
                body = body_for("klein", size, steps)
                timed_post(client, body, raw=True)  # the first call after warm-up (allocator)
                raw = [timed_post(client, body, raw=True) for _ in range(run.runs)]
                answered = [timed_post(client, body, raw=False) for _ in range(run.runs)]
                images[name] = raw[0][1]
                speed = client.get("/info").json()["speed_modes"]["backends"].get("flux-local")
        except (RuntimeError, ValueError) as error:  # fp8 refused (CPU, older GPU): the service's own words
            result[name] = {"refused": str(error).splitlines()[-2 if isinstance(error, ValueError) else 0].strip()}
            continue
        result[name] = {
            "raw_png_s": round(statistics.median(t for t, _ in raw), 4),
            "json_s": round(statistics.median(t for t, _ in answered), 4),
            "ready_s": round(ready, 1),
            "speed_modes": speed,
        }
    run.shared["klein_images"] = images
    best = min((entry["raw_png_s"] for entry in result.values() if "raw_png_s" in entry), default=None)
    return {
        "size": size,
        "steps": steps,
        "variants": result,
        "best_raw_png_s": best,
        "target_s": TARGETS["klein_latency"],
    }


def fp8_vs_bf16(run: Run) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    images = run.shared.get("klein_images", {})
    if "compiled" not in images or "compiled_fp8" not in images:
        return {"skipped": "needs both compiled images of klein_latency (fp8 refused or failed there)"}
    bf16, fp8 = (
        np.asarray(Image.open(io.BytesIO(images[name])).convert("RGB"), dtype=np.float64)
        for name in ("compiled", "compiled_fp8")
    )
    difference = np.abs(bf16 - fp8)
    mse = float((difference**2).mean())
    return {
        "mean_abs_difference": round(float(difference.mean()), 3),
        "max_abs_difference": int(difference.max()),
        "psnr_db": round(10 * np.log10(255**2 / mse), 2) if mse > 0 else None,
        "note": "random weights: read it as how much fp8 moves pixels, not as image quality",
    }


def klein_throughput(run: Run) -> dict[str, Any]:
    pipe, _ = run.model("klein")
    size, steps, clients = run.size["klein"], 4, 8
    count = 4 if run.dry_run else 24
    plain_seconds: float | None = None
    if pipe is None:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(run.folders["klein"]).to("cuda" if run.cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    plain_call(pipe, "klein", size, steps, 1, 0)
    began = time.perf_counter()
    for index in range(count):
        plain_call(pipe, "klein", size, steps, 1, index)
    plain_seconds = time.perf_counter() - began
    free(pipe)
    pipe = None
    with service(run.settings("klein", max_batch=4)) as client:
        body = body_for("klein", size, steps)
        timed_post(client, body, raw=True)
        samples = NvmlSampler() if run.cuda else None
        began = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool, samples or _nothing():
            list(pool.map(lambda i: timed_post(client, {**body, "seed": i}, raw=True), range(count)))
        service_seconds = time.perf_counter() - began
    plain_rate, service_rate = count / plain_seconds, count / service_seconds
    run.shared["gpu_idle"] = samples.summary() if samples is not None else {"skipped": "no CUDA GPU (NVML)"}
    return {
        "size": size,
        "steps": steps,
        "images": count,
        "clients": clients,
        "plain_images_per_s": round(plain_rate, 3),
        "service_images_per_s": round(service_rate, 3),
        "service_vs_plain": round(service_rate / plain_rate, 3),
        "target": TARGETS["klein_throughput"],
    }


def gpu_idle(run: Run) -> dict[str, Any]:
    found = run.shared.get("gpu_idle")
    if found is None:
        return {"skipped": "measured during klein_throughput: run that section too"}
    return {**found, "target_idle_percent": TARGETS["gpu_idle"]}


def step_rate(run: Run, family: str, compile_mode: str) -> dict[str, Any]:
    pipe, _ = run.model(family)
    size = run.size[family]
    low, high = (1, 3) if run.dry_run else (10, 30)
    plain: dict[int, float] = {}
    if pipe is not None:
        plain_call(pipe, family, size, low, 1, 0)
        for steps in (low, high):
            plain[steps] = min(plain_call(pipe, family, size, steps, 1, i) for i in range(run.runs))
        free(pipe)
        pipe = None
    served: dict[int, float] = {}
    with service(run.settings(family, compile=compile_mode)) as client:
        speed = client.get("/info").json()["speed_modes"]["backends"].get("sd")
        timed_post(client, body_for(family, size, low), raw=True)
        for steps in (low, high):
            served[steps] = min(
                timed_post(client, body_for(family, size, steps, i), raw=True)[0] for i in range(run.runs)
            )

    def rate(times: dict[int, float]) -> float | None:
        if not times or times[high] <= times[low]:
            return None  # tiny dry-run shapes: steps cost less than the noise
        return round((high - low) / (times[high] - times[low]), 2)

    return {
        "size": size,
        "steps": [low, high],
        "compile": compile_mode,
        "service_compiled_it_per_s": rate(served),
        "plain_eager_it_per_s": rate(plain),
        "service_seconds": {str(k): round(v, 4) for k, v in served.items()},
        "speed_modes": speed,
    }


def sd15(run: Run) -> dict[str, Any]:
    return {**step_rate(run, "sd15", "full"), "target_it_per_s": TARGETS["sd15"]}


def sdxl(run: Run) -> dict[str, Any]:
    return step_rate(run, "sdxl", "regional")


class NvmlSampler:
    """GPU utilization samples from NVML (nvidia-ml-py) while the block runs: NVML keeps a buffer of
    fine-grained samples (one per ~1/6 s or faster), read after the block through nvmlDeviceGetSamples."""

    def __init__(self) -> None:
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.values: list[int] = []
        self._stop = threading.Event()

    def __enter__(self) -> NvmlSampler:
        self._since = int(time.time() * 1e6)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        since = self._since
        while not self._stop.wait(0.5):
            since = self._read(since)
        self._read(since)

    def _read(self, since: int) -> int:
        nvml = self.nvml
        try:
            _, samples = nvml.nvmlDeviceGetSamples(self.handle, nvml.NVML_GPU_UTILIZATION_SAMPLES, since)
        except nvml.NVMLError:
            return since
        for sample in samples:
            if sample.timeStamp > since:
                self.values.append(int(sample.sampleValue.uiVal))
                since = max(since, sample.timeStamp)
        return since

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        if not self.values:
            return {"error": "NVML gave no utilization samples"}
        busy = statistics.mean(self.values)
        return {
            "samples": len(self.values),
            "utilization_percent": round(busy, 1),
            "idle_percent": round(100 - busy, 1),
        }


@contextmanager
def _nothing() -> Iterator[None]:
    yield


RUNNERS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "klein_latency": klein_latency,
    "fp8_vs_bf16": fp8_vs_bf16,
    "klein_throughput": klein_throughput,
    "gpu_idle": gpu_idle,
    "sd15": sd15,
    "sdxl": sdxl,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny built-in models on CPU (checks the script)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--runs", type=int, default=5, help="timed requests per figure (dry run: 1)")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_fast_path.jsonl (default: stdout only)")
    args = parser.parse_args(argv)
    import diffusers
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_fast_path.py needs a CUDA GPU (use --dry-run to check the script on CPU)")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args)
    device = torch.cuda.get_device_name(0) if run.cuda else "cpu"
    try:
        for section in args.sections:
            started = time.perf_counter()
            try:
                figures = RUNNERS[section](run)
            except Exception as error:  # noqa: BLE001 - one section failing must not hide the others
                figures = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            sync()
            line = json.dumps(
                {
                    "bench": "gpu_fast_path",
                    "section": section,
                    "dry_run": args.dry_run,
                    "device": device,
                    "torch": torch.__version__,
                    "diffusers": diffusers.__version__,
                    **figures,
                    "seconds": round(time.perf_counter() - started, 1),
                }
            )
            print(line, flush=True)
            if args.out is not None:
                with (args.out / "gpu_fast_path.jsonl").open("a") as handle:
                    handle.write(line + "\n")
    finally:
        shutil.rmtree(run.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
