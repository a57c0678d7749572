"""Lane utilisation of the local device path (issue 16, "the device never waits for the CPU").

`lane_utilisation()` measures how much of the device's time a saturated lane keeps it denoising: a
backend built on the real LocalPipelineBackend (its device thread, lock, checks and the conversion to
images; the engine's lane, batching off, and the storing of the images) whose pipeline sleeps like a
GPU (time.sleep releases the GIL, as a CUDA call does) and returns 1024x1024 float noise. Four
clients keep the lane full through the real JobEngine; the figure is

    images/s measured x generation time per image

so 1.0 means the device never waited for the CPU (every second of the run was a pipeline call) and
0.8 means a fifth of the device's time went to the work done between two calls on the device's path.
Target >= 0.97. Run in the embedded engine with SD_DEVICE_ISOLATION=thread: the figure is about the
device path, not the pipe of the device process (bench/bench_isolation.py measures that).

The row is a JSON-able dict like the other bench modules' rows (bench/bench_fast_path.py lists it).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: One image's generation time on the "GPU" (seconds a pipeline call sleeps per image).
GENERATION_SECONDS = 0.25
SIDE = 1024
CLIENTS = 4
IMAGES = 48  # 12 s of generation: the first and last batch (nothing to overlap) weigh little
TARGET = 0.97
#: Seconds of each pipeline call of the timed run (the device's busy time).
CALL_SECONDS: list[float] = []
#: JPEG: the encoder is the other half of issue 16 (its own rows); it runs off the lane either way.
FORMAT: dict[str, Any] = {"output_format": "jpeg"}


def _backend_class() -> type:
    from imagegen.backends.base import Capabilities, RunContext
    from imagegen.backends.conditioning import Conditioning
    from imagegen.backends.local.base import LoadedPipeline, LocalPipelineBackend
    from imagegen.config import Settings
    from imagegen.generation import GenerationRequest

    class SleepingGpuBackend(LocalPipelineBackend):
        """The real local base class; only the pipeline is a sleep that returns 1024x1024 noise."""

        id = "gpu-sleep"

        def __init__(self, settings: Settings) -> None:
            super().__init__(settings, "gpu-sleep-model")
            self._noise: dict[tuple[int, int], Any] = {}

        def capabilities(self) -> Capabilities:
            settings = self.settings
            return Capabilities(
                models=("gpu-sleep-model",),
                default_width=SIDE,
                default_height=SIDE,
                size_multiple=8,
                min_size=64,
                max_width=max(SIDE, settings.max_width),
                max_height=max(SIDE, settings.max_height),
                max_pixels=max(SIDE * SIDE, settings.max_pixels),
                default_steps=4,
                max_steps=settings.max_steps,
                max_batch=1,
                schedulers=("default",),
                default_scheduler="default",
            )

        def load_pipeline(self) -> LoadedPipeline:
            return LoadedPipeline(None, "cpu", "float32", None, {"pipeline_class": "SleepingGpu", "native_size": SIDE})

        def run_pipeline(
            self, loaded: LoadedPipeline, batch: Sequence[GenerationRequest], ctx: RunContext, inputs: Conditioning
        ) -> Any:
            import numpy as np

            called = time.perf_counter()
            first = batch[0]
            count = sum(request.num_images for request in batch)
            steps = first.steps or 4
            for step in range(steps):
                time.sleep(GENERATION_SECONDS * count / steps)  # the GPU: the GIL is free meanwhile
                ctx.report_step(step + 1, steps)
                ctx.check()
            # The decoded images, as a GPU hands them over at the end of its call: made once per size
            # (making 12 MB of noise on this CPU would add ~15 ms of work a GPU never does).
            key = (first.height, first.width)
            if key not in self._noise:
                self._noise[key] = np.random.default_rng(0).random((2, *key, 3), dtype=np.float32)
            noise = self._noise[key]
            images = np.stack([noise[seed % 2] for request in batch for seed in request.seeds])
            # The generation time of this call as the device saw it: sleeps overshoot on a busy machine,
            # and a GPU call that takes longer is still the device working.
            CALL_SECONDS.append(time.perf_counter() - called)
            return images

    return SleepingGpuBackend


async def _saturate(root: Path) -> tuple[float, int]:
    from imagegen.backends.registry import BackendRegistry
    from imagegen.config import Settings
    from imagegen.engine.engine import JobEngine
    from imagegen.engine.events import JobEvents
    from imagegen.engine.store import SQLiteJobStore
    from imagegen.generation import GenerationParams
    from imagegen.storage.outputs import OutputStore

    settings = Settings(
        _env_file=None,
        output_dir=root / "outputs",
        data_dir=root / "data",
        device_isolation="thread",
        max_batch=1,
        max_width=SIDE,
        max_height=SIDE,
        max_pixels=SIDE * SIDE,
        preview_interval=0,
        safety_checker=False,
        log_level="warning",
    )
    backend_class = _backend_class()
    registry = BackendRegistry.from_settings(
        settings, {backend_class.id: backend_class}, default_id=backend_class.id, only=[backend_class.id]
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = SQLiteJobStore(settings.data_dir / "jobs.sqlite3")
    engine = JobEngine(settings, registry, store, OutputStore(settings.output_dir), JobEvents())
    await registry.start()
    await engine.start()
    try:
        params = GenerationParams(prompt="noise", width=SIDE, height=SIDE, steps=4, seed=1, **FORMAT)
        await engine.wait((await engine.submit(params, backend_class.id)).id)  # loaded, warm

        remaining = IMAGES

        async def client(index: int) -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                job = await engine.submit(
                    GenerationParams(prompt=f"noise {index}", width=SIDE, height=SIDE, steps=4, seed=index, **FORMAT),
                    backend_class.id,
                )
                done = await engine.wait(job.id)
                assert done.status.value == "succeeded", done.error

        CALL_SECONDS.clear()
        started = time.perf_counter()
        await asyncio.gather(*(client(index) for index in range(CLIENTS)))
        return time.perf_counter() - started, IMAGES
    finally:
        await engine.shutdown(5)
        await registry.close()


def lane_utilisation() -> dict[str, Any]:
    """images/s with CLIENTS clients x generation time per image, as measured inside the pipeline calls
    (1.0: the device never waited)."""
    with tempfile.TemporaryDirectory(prefix="bench-fast-path-lane-") as folder:
        seconds, images = asyncio.run(_saturate(Path(folder)))
    rate = images / seconds
    generation = sum(CALL_SECONDS) / len(CALL_SECONDS)  # measured per image (SD_MAX_BATCH=1)
    value = rate * generation
    nominal = rate * GENERATION_SECONDS
    return {
        "metric": "lane_utilisation",
        "value": round(value, 3),
        "unit": "x",
        "target": f">= {TARGET}",
        "met": value >= TARGET,
        "detail": f"{CLIENTS} clients, {images} images of {SIDE}x{SIDE} through the embedded engine (thread "
        f"isolation, SD_MAX_BATCH=1) on a LocalPipelineBackend whose pipeline sleeps {GENERATION_SECONDS:g} s "
        f"per image: {rate:.2f} images/s in {seconds:.2f} s x {generation * 1000:.1f} ms per pipeline call "
        f"(measured: the sleeps overshoot); x the nominal {GENERATION_SECONDS * 1000:.0f} ms: {nominal:.3f}",
    }


if __name__ == "__main__":
    import json

    print(json.dumps(lane_utilisation()))
