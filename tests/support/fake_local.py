"""A fake *local* backend for the device rules (deadlines, cancel, kill, restart, shutdown): built on the
real LocalPipelineBackend, so the real host, supervisor, device thread and engine code run, and only
the pipeline is fake. Importable by path (`tests.support.fake_local:FakeLocalBackend`), as the device
process needs; register it as `{"fake-local": FakeLocalBackend}`.

Its pipeline call costs time like a real one, in proportion to pixels x images x steps
(STEP_SECONDS_PER_MEGAPIXEL per megapixel-step, at least MIN_STEP_SECONDS a step), and reports each
step through the real callback path (ctx.report_step, then ctx.check, which raises when cancelled).
Words in the prompt change that:
  "wedge"     the second step is a plain time.sleep(WEDGE_SECONDS) with no step callback, as a
              pipeline call that cannot be interrupted; "wedge3" sleeps 3 s instead
  "crawl"     every step takes CRAWL_STEP_SECONDS (cooperative: it stops between steps)
  "die"       the process kills itself with SIGKILL at the second step (what the OOM killer does)
  "segfault"  the process dies of SIGSEGV at the second step
  "slowfinish" finishing the images (after the device is released, on the finisher thread) takes
              SLOW_FINISH_SECONDS
Never send "die" or "segfault" to a backend running in the test process (SD_DEVICE_ISOLATION=thread).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Sequence
from typing import Any

from imagegen.backends.base import Capabilities, RunContext
from imagegen.backends.conditioning import Conditioning
from imagegen.backends.local.base import LoadedPipeline, LocalPipelineBackend
from imagegen.backends.local.finisher import HostImages
from imagegen.config import Settings
from imagegen.generation import GeneratedImage, GenerationRequest

MODEL = "fake-local-model"
STEP_SECONDS_PER_MEGAPIXEL = 0.25
MIN_STEP_SECONDS = 0.01
CRAWL_STEP_SECONDS = 0.2
WEDGE_SECONDS = 300.0
SLOW_FINISH_SECONDS = 0.8

_WEDGE = re.compile(r"wedge(\d+(?:\.\d+)?)?")


def step_seconds(width: int, height: int, images: int) -> float:
    return max(MIN_STEP_SECONDS, STEP_SECONDS_PER_MEGAPIXEL * width * height * images / 1e6)


def pixel_value(seed: int) -> float:
    """The colour of an image, from its seed (never black: the real check refuses black images)."""
    return (seed % 200 + 40) / 255


class FakeLocalBackend(LocalPipelineBackend):
    id = "fake-local"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, MODEL)

    def capabilities(self) -> Capabilities:
        settings = self.settings
        return Capabilities(
            models=(MODEL,),
            default_width=64,
            default_height=64,
            size_multiple=8,
            min_size=16,
            max_width=settings.max_width,
            max_height=settings.max_height,
            max_pixels=settings.max_pixels,
            default_steps=4,
            max_steps=settings.max_steps,
            max_batch=8,
            schedulers=("default",),
            default_scheduler="default",
        )

    def load_pipeline(self) -> LoadedPipeline:
        return LoadedPipeline(None, "cpu", "float32", None, {"pipeline_class": "FakeLocalPipeline", "native_size": 64})

    def run_pipeline(
        self, loaded: LoadedPipeline, batch: Sequence[GenerationRequest], ctx: RunContext, inputs: Conditioning
    ) -> Any:
        import numpy as np

        first = batch[0]
        prompts = " ".join(request.prompt for request in batch)
        seeds = [seed for request in batch for seed in request.seeds]
        steps = first.steps or 4
        per_step = CRAWL_STEP_SECONDS if "crawl" in prompts else step_seconds(first.width, first.height, len(seeds))
        wedge = _WEDGE.search(prompts)
        for step in range(steps):
            if step == 1:
                if wedge is not None:
                    time.sleep(float(wedge.group(1) or WEDGE_SECONDS))  # no step callback: nothing stops it
                if "die" in prompts:
                    os.kill(os.getpid(), signal.SIGKILL)
                if "segfault" in prompts:
                    os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(per_step)
            ctx.report_step(step + 1, steps)
            ctx.check()
        return np.stack(
            [np.full((first.height, first.width, 3), pixel_value(seed), dtype=np.float32) for seed in seeds]
        )

    def _finish(
        self, batch: list[GenerationRequest], host: HostImages, info: dict[str, Any]
    ) -> list[list[GeneratedImage]]:
        if any("slowfinish" in request.prompt for request in batch):
            time.sleep(SLOW_FINISH_SECONDS)
        return super()._finish(batch, host, info)
