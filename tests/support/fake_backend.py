"""A deterministic fake backend for engine, load and fault tests, where the point is the service.

The image is a pure function of (prompt, seed, width, height), and the seed is written into the
first pixels, so a test can tell from an image alone which request and seed it belongs to. Words in
the prompt inject behaviour, so a test (or a server in another process) needs no extra wiring:
  "hang"    never finishes (until the deadline or a cancel)
  "slow"    10x the step delay
  "oom"     raises the out-of-memory error a CUDA backend raises
  "fail"    raises a generation error
  "crash"   raises an unexpected exception (a bug)
  "nsfw"    the image is flagged by the "safety checker"
  "fatal"   the backend breaks for good (a lost device): it raises and its health turns to error

It does img2img and inpainting the way the real backends start them: the request's input images are
read from the input store (SD_DATA_DIR/inputs), so a job whose inputs are gone fails as it would there;
each image's info names the init image it was conditioned on (`conditioned_on`, its content hash).
Like the local backends it sends live previews (small JPEGs) when the run context asks for them.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from PIL import Image

from imagegen.backends import conditioning
from imagegen.backends.base import BackendHealth, BackendState, Capabilities, ImageBackend, RunContext
from imagegen.errors import BackendUnavailableError, GenerationFailedError, OutOfMemoryError
from imagegen.generation import GeneratedImage, GenerationRequest
from imagegen.storage.inputs import InputStore


def expected_pixels(prompt: str, seed: int, width: int, height: int) -> Image.Image:
    digest = hashlib.sha256(f"{prompt}|{seed}|{width}x{height}".encode()).digest()
    image = Image.new("RGB", (width, height), tuple(digest[:3]))
    # The seed, little-endian, in the first 4 pixels' red channel.
    for index, byte in enumerate(int(seed).to_bytes(4, "little")):
        image.putpixel((index, 0), (byte, digest[3], digest[4]))
    return image


def seed_of(image: Image.Image) -> int:
    rgb = image.convert("RGB")
    return int.from_bytes(bytes(rgb.getpixel((index, 0))[0] for index in range(4)), "little")


def preview_jpeg(request: GenerationRequest, step: int) -> bytes:
    """The fake's live preview of a request at a step: its first image at an eighth of the size (at least
    8 px), in JPEG as the local backends send them, with the step in its red channel."""
    small = expected_pixels(request.prompt, request.seeds[0], request.width, request.height).resize(
        (max(8, request.width // 8), max(8, request.height // 8))
    )
    small.paste((min(255, step * 16), 0, 0), (0, 0, small.width, small.height // 2))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class FakeBackend(ImageBackend):
    id = "fake"

    def __init__(
        self,
        settings: Any,
        *,
        backend_id: str = "fake",
        lane: str = "fake",
        concurrency: int = 1,
        step_delay: float = 0.005,
        default_steps: int = 4,
        max_batch: int = 8,
        state: BackendState = BackendState.READY,
        models: tuple[str, ...] = ("fake-model",),
    ) -> None:
        super().__init__(settings)
        self.id = backend_id
        self.lane = lane
        self.concurrency = concurrency
        self.step_delay = step_delay
        self.default_steps = default_steps
        self.max_batch = max_batch
        self.state = state
        self.models = tuple(models)
        self.calls: list[list[GenerationRequest]] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._release_hang: asyncio.Event | None = None
        #: A file to append "<seeds> <step> <unix time>" to at each step (progress latency benchmark).
        self.step_log: str | None = None

    def release(self) -> None:
        """Let every "hang" call (current and future) go on; callable from any thread."""
        if self._loop is not None and self._release_hang is not None:
            self._loop.call_soon_threadsafe(self._release_hang.set)

    def capabilities(self) -> Capabilities:
        return Capabilities(
            models=self.models,
            default_width=64,
            default_height=64,
            size_multiple=8,
            min_size=8,
            max_width=4096,
            max_height=4096,
            max_pixels=4096 * 4096,
            default_steps=self.default_steps,
            max_steps=1000,
            max_batch=self.max_batch,
            schedulers=("default", "euler"),
            default_scheduler="default",
            modes=("txt2img", "img2img", "inpaint"),
        )

    def health(self) -> BackendHealth:
        return BackendHealth(
            self.state,
            f"fake backend is {self.state.value}",
            model=self.default_model_id(),
            device="cpu",
            dtype="none",
            loaded=self.state is BackendState.READY,
        )

    async def generate(self, batch: Sequence[GenerationRequest], ctx: RunContext) -> list[list[GeneratedImage]]:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._release_hang = asyncio.Event()
        self.calls.append(list(batch))
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            return await self._generate(batch, ctx)
        finally:
            with self._lock:
                self.active -= 1

    async def _generate(self, batch: Sequence[GenerationRequest], ctx: RunContext) -> list[list[GeneratedImage]]:
        prompts = " ".join(request.prompt for request in batch)
        if "fatal" in prompts or self.state is BackendState.ERROR:
            self.state = BackendState.ERROR
            raise BackendUnavailableError(f"backend '{self.id}' failed fatally (fake device lost)")
        if "oom" in prompts:
            raise OutOfMemoryError("out of memory (fake): reduce the size or the number of images")
        if "crash" in prompts:
            raise RuntimeError("fake backend bug")
        if "fail" in prompts:
            raise GenerationFailedError("fake generation failure")
        info: dict[str, Any] = {}
        if batch[0].mode != "txt2img":
            await asyncio.to_thread(conditioning.load, InputStore(self.settings.inputs_dir), batch[0])
            info["conditioned_on"] = batch[0].images[0].sha256
        steps = batch[0].denoising_steps or self.default_steps
        delay = self.step_delay * (10 if "slow" in prompts else 1)
        if "hang" in prompts:
            assert self._release_hang is not None
            await self._release_hang.wait()
        for step in range(steps):
            await asyncio.sleep(delay)
            if self.step_log:
                with open(self.step_log, "a") as log:
                    log.write(f"{','.join(ctx.job_ids)} {step + 1} {time.time():.6f}\n")
            ctx.report_step(step + 1, steps)
            if ctx.preview_due(step + 1, steps):
                ctx.report_preview(step + 1, steps, [preview_jpeg(request, step + 1) for request in batch])
            ctx.check()
        results = []
        for request in batch:
            images = []
            for seed in request.seeds:
                nsfw = "nsfw" in request.prompt
                pixels = None if nsfw else expected_pixels(request.prompt, seed, request.width, request.height)
                images.append(GeneratedImage(seed=seed, image=pixels, nsfw=nsfw, info=dict(info)))
            results.append(images)
        return results


def from_env(settings: Any) -> FakeBackend:
    """A FakeBackend configured from the environment, for a process that builds its backends from an
    importable factory (`imagegen worker --backend-factory fake=tests.support.fake_backend:from_env`):
    FAKE_STEP_DELAY (seconds per step), FAKE_MAX_BATCH, FAKE_DEFAULT_STEPS, FAKE_MODELS (comma-separated),
    FAKE_STEP_LOG (a file that gets one line per step: job ids, step, wall time; the benchmarks measure
    progress latency with it)."""
    backend = FakeBackend(
        settings,
        step_delay=float(os.environ.get("FAKE_STEP_DELAY", "0.005")),
        max_batch=int(os.environ.get("FAKE_MAX_BATCH", "8")),
        default_steps=int(os.environ.get("FAKE_DEFAULT_STEPS", "4")),
        models=tuple(os.environ.get("FAKE_MODELS", "fake-model").split(",")),
    )
    backend.step_log = os.environ.get("FAKE_STEP_LOG") or None
    return backend
