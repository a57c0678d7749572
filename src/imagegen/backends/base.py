"""The backend interface: what every engine behind the API provides.

Modelled on TGI's `Backend` trait: a small, explicit surface. A backend declares its capabilities,
reports its health, turns loose request parameters into a validated `GenerationRequest`, and
generates a batch of requests at a time. Heavy imports (torch, diffusers) happen inside the local
backends when they load, never at import time of this module.
"""

from __future__ import annotations

import abc
import enum
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from imagegen.config import Settings
from imagegen.errors import (
    DeadlineExceededError,
    InvalidParameterError,
    JobCancelledError,
)
from imagegen.generation import SEED_MAX, GeneratedImage, GenerationParams, GenerationRequest


class BackendState(str, enum.Enum):
    READY = "ready"
    LOADING = "loading"
    UNAVAILABLE = "unavailable"
    ERROR = "error"
    NOT_CONFIGURED = "not_configured"


@dataclass(frozen=True)
class Capabilities:
    """What a backend accepts. The API validates against this before a job is queued."""

    models: tuple[str, ...]
    default_width: int
    default_height: int
    size_multiple: int
    min_size: int
    max_width: int
    max_height: int
    max_pixels: int
    default_steps: int | None
    max_steps: int
    max_batch: int
    supports_negative_prompt: bool = True
    supports_guidance: bool = True
    default_guidance: float | None = 7.5
    schedulers: tuple[str, ...] = ()
    default_scheduler: str | None = None
    supports_seed: bool = True
    output_formats: tuple[str, ...] = ("png", "jpeg", "webp")
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": list(self.models),
            "default_size": [self.default_width, self.default_height],
            "size_multiple": self.size_multiple,
            "min_size": self.min_size,
            "max_width": self.max_width,
            "max_height": self.max_height,
            "max_pixels": self.max_pixels,
            "default_steps": self.default_steps,
            "max_steps": self.max_steps,
            "max_batch": self.max_batch,
            "supports_negative_prompt": self.supports_negative_prompt,
            "supports_guidance": self.supports_guidance,
            "default_guidance": self.default_guidance,
            "schedulers": list(self.schedulers),
            "default_scheduler": self.default_scheduler,
            "supports_seed": self.supports_seed,
            "output_formats": list(self.output_formats),
            "notes": list(self.notes),
        }


@dataclass
class BackendHealth:
    state: BackendState
    reason: str
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    loaded: bool = False
    memory: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "state": self.state.value,
            "reason": self.reason,
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "loaded": self.loaded,
        }
        if self.memory is not None:
            data["memory"] = self.memory
        data.update(self.details)
        return data


class RunContext:
    """Given to `generate`: progress reporting, cancellation and the deadline of a batch.

    Thread-safe; local backends call it from their device thread between denoising steps. A backend
    that queues for a device of its own (`ImageBackend.reports_start`) calls `mark_started()` when the
    batch really has it: the engine counts the run deadline from then, and shows the jobs `running`
    only from then. Before that the deadline is infinite (`math.inf`).
    """

    def __init__(
        self,
        job_ids: Sequence[str],
        deadline: float = math.inf,
        on_progress: Callable[[int, int], None] | None = None,
        on_started: Callable[[], None] | None = None,
    ) -> None:
        self.job_ids = list(job_ids)
        self.deadline = deadline
        self._on_progress = on_progress
        self._on_started = on_started
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._started_at: float | None = None
        #: Why the engine stopped the batch (deadline, cancelled, shutdown), for logs and health.
        self.stop_reason: str | None = None
        #: Set by the engine when the batch must end now (shutdown): no cooperative grace.
        self.urgent = False

    def cancel(self, index: int) -> None:
        with self._lock:
            self._cancelled.add(index)

    def cancel_all(self) -> None:
        with self._lock:
            self._cancelled.update(range(len(self.job_ids)))

    @property
    def all_cancelled(self) -> bool:
        with self._lock:
            return len(self._cancelled) >= len(self.job_ids)

    def mark_started(self) -> None:
        """The batch has the device now (called once, from any thread; later calls do nothing)."""
        with self._lock:
            if self._started_at is not None:
                return
            self._started_at = time.monotonic()
        if self._on_started is not None:
            self._on_started()

    @property
    def started(self) -> bool:
        return self._started_at is not None

    def report_step(self, step: int, total: int) -> None:
        if self._on_progress is not None:
            self._on_progress(step, total)

    def check(self) -> None:
        """Raise when the batch must stop now: everyone cancelled or the deadline passed."""
        if self.all_cancelled:
            raise JobCancelledError("cancelled")
        if time.monotonic() > self.deadline:
            raise DeadlineExceededError("the job exceeded its deadline (SD_JOB_TIMEOUT)")


class ImageBackend(abc.ABC):
    """One engine behind the API."""

    #: Stable id used in requests (`backend`), settings and metrics.
    id: str
    #: Jobs whose backends share a lane share one queue and its concurrency (local backends share
    #: the device; the cloud backend has its own lane).
    lane: str = "local"
    #: How many batches this backend's lane may run at the same time.
    concurrency: int = 1
    #: Set by the registry: the default backend loads at start-up, the others on first use.
    preload: bool = False
    #: The model a request that names none gets; None: the first of `capabilities().models`.
    #: Changed at runtime when a client picks the service's default model (A1111 options).
    default_model: str | None = None
    #: True when `generate` may wait for a device of its own before the batch runs, and says when it
    #: has it (`RunContext.mark_started`); otherwise the engine counts the batch started at once.
    reports_start: bool = False
    #: True when the backend runs on this machine's device: the engine measures its step times and
    #: refuses up front a request that could not finish within SD_JOB_TIMEOUT (engine/cost.py).
    runs_on_device: bool = False

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    def capabilities_for(self, model: str) -> Capabilities:
        """What the backend accepts for one of its models. Backends whose models differ in sizes or
        defaults (sd serving SD 1.x and SDXL) override this; `resolve` validates against it."""
        return self.capabilities()

    @abc.abstractmethod
    def health(self) -> BackendHealth: ...

    async def start(self) -> None:
        """Begin loading (in the background) when `preload` is set."""

    async def close(self) -> None:
        """Release everything the backend holds."""

    async def until_available(self) -> None:
        """Return when a batch sent now would get the device without waiting for it to come back
        (a device process restarting); the engine asks before it takes the next batch off the queue,
        so that jobs wait at their queue position. Backends without such a device return at once."""

    @abc.abstractmethod
    async def generate(self, batch: Sequence[GenerationRequest], ctx: RunContext) -> list[list[GeneratedImage]]:
        """Generate every request of the batch; one list of images per request, in order."""

    def info(self) -> dict[str, Any]:
        """Extra, secret-free facts for /api/backends."""
        return {}

    # -- validation ----------------------------------------------------------------------------
    def resolve(self, params: GenerationParams) -> GenerationRequest:
        """Validate loose parameters against this backend and the service limits; fill defaults.

        Raises InvalidParameterError naming the parameter. Nothing here touches the model."""
        caps = self.capabilities()
        settings = self.settings
        ignored: list[str] = []

        model = params.model or self.default_model or caps.models[0]
        if model not in caps.models:
            raise InvalidParameterError(
                f"model is not available on backend '{self.id}'; available: {', '.join(caps.models)}",
                param="model",
            )
        caps = self.capabilities_for(model)

        prompt = params.prompt
        if not prompt.strip():
            raise InvalidParameterError("prompt must not be empty", param="prompt")
        if len(prompt) > settings.max_prompt_chars:
            raise InvalidParameterError(
                f"prompt is longer than {settings.max_prompt_chars} characters (SD_MAX_PROMPT_CHARS)",
                param="prompt",
            )
        negative = params.negative_prompt
        if negative is not None and len(negative) > settings.max_prompt_chars:
            raise InvalidParameterError(
                f"negative_prompt is longer than {settings.max_prompt_chars} characters (SD_MAX_PROMPT_CHARS)",
                param="negative_prompt",
            )
        if negative and not caps.supports_negative_prompt:
            ignored.append("negative_prompt")
            negative = None

        width = caps.default_width if params.width is None else params.width
        height = caps.default_height if params.height is None else params.height
        max_width = min(caps.max_width, settings.max_width)
        max_height = min(caps.max_height, settings.max_height)
        max_pixels = min(caps.max_pixels, settings.max_pixels)
        for name, value, upper in (("width", width, max_width), ("height", height, max_height)):
            if value < caps.min_size:
                raise InvalidParameterError(f"{name} must be at least {caps.min_size}", param=name)
            if value > upper:
                raise InvalidParameterError(f"{name} must be at most {upper}", param=name)
            if value % caps.size_multiple:
                raise InvalidParameterError(
                    f"{name} must be a multiple of {caps.size_multiple} for backend '{self.id}'", param=name
                )
        if width * height > max_pixels:
            raise InvalidParameterError(
                f"width x height must be at most {max_pixels} pixels (SD_MAX_PIXELS)", param="width"
            )

        steps: int | None
        if caps.default_steps is None:
            steps = None
            if params.steps is not None:
                ignored.append("steps")
        else:
            steps = caps.default_steps if params.steps is None else params.steps
            upper = min(caps.max_steps, settings.max_steps)
            if not 1 <= steps <= upper:
                raise InvalidParameterError(f"steps must be between 1 and {upper}", param="steps")

        guidance: float | None
        if caps.supports_guidance:
            guidance = caps.default_guidance if params.guidance_scale is None else params.guidance_scale
            if guidance is not None and not 0.0 <= guidance <= 30.0:
                raise InvalidParameterError("guidance_scale must be between 0 and 30", param="guidance_scale")
        else:
            guidance = None
            if params.guidance_scale is not None:
                ignored.append("guidance_scale")

        scheduler: str | None = None
        if caps.schedulers:
            scheduler = params.scheduler or caps.default_scheduler
            if scheduler not in caps.schedulers:
                raise InvalidParameterError(
                    f"unknown scheduler; available: {', '.join(caps.schedulers)}", param="scheduler"
                )
        elif params.scheduler:
            ignored.append("scheduler")

        if not 1 <= params.num_images <= settings.max_images:
            raise InvalidParameterError(
                f"num_images must be between 1 and {settings.max_images} (SD_MAX_IMAGES)", param="num_images"
            )
        if params.output_format not in caps.output_formats:
            raise InvalidParameterError(
                f"output_format must be one of {', '.join(caps.output_formats)}", param="output_format"
            )

        seed = params.seed
        if seed is None or seed == -1:
            seed = secrets.randbelow(SEED_MAX + 1)
        elif not 0 <= seed <= SEED_MAX:
            raise InvalidParameterError(f"seed must be -1 (random) or between 0 and {SEED_MAX}", param="seed")
        seeds = tuple((seed + i) % (SEED_MAX + 1) for i in range(params.num_images))

        return GenerationRequest(
            backend=self.id,
            model=model,
            prompt=prompt,
            negative_prompt=negative or None,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance,
            scheduler=scheduler,
            seeds=seeds,
            output_format=params.output_format,
            ignored=tuple(ignored),
            backend_options=dict(params.backend_options),
        )
