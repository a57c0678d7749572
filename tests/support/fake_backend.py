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
Like the local backends it sends live previews (small JPEGs) when the run context asks for them.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
from collections.abc import Sequence
from typing import Any

from PIL import Image

from imagegen.backends.base import BackendHealth, BackendState, Capabilities, ImageBackend, RunContext
from imagegen.errors import BackendUnavailableError, GenerationFailedError, OutOfMemoryError
from imagegen.generation import GeneratedImage, GenerationRequest


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
    ) -> None:
        super().__init__(settings)
        self.id = backend_id
        self.lane = lane
        self.concurrency = concurrency
        self.step_delay = step_delay
        self.default_steps = default_steps
        self.max_batch = max_batch
        self.state = state
        self.calls: list[list[GenerationRequest]] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._release_hang: asyncio.Event | None = None

    def release(self) -> None:
        """Let every "hang" call (current and future) go on; callable from any thread."""
        if self._loop is not None and self._release_hang is not None:
            self._loop.call_soon_threadsafe(self._release_hang.set)

    def capabilities(self) -> Capabilities:
        return Capabilities(
            models=("fake-model",),
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
        )

    def health(self) -> BackendHealth:
        return BackendHealth(
            self.state,
            f"fake backend is {self.state.value}",
            model="fake-model",
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
        steps = batch[0].steps or self.default_steps
        delay = self.step_delay * (10 if "slow" in prompts else 1)
        if "hang" in prompts:
            assert self._release_hang is not None
            await self._release_hang.wait()
        for step in range(steps):
            await asyncio.sleep(delay)
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
                images.append(GeneratedImage(seed=seed, image=pixels, nsfw=nsfw))
            results.append(images)
        return results
