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
    require_between,
    require_pixels,
)
from imagegen.generation import SEED_MAX, GeneratedImage, GenerationParams, GenerationRequest, LoraWeight, Mode
from imagegen.storage.lora_format import LoraFamily
from imagegen.storage.loras import LoraCatalog

#: The strength a request that sets none gets: img2img keeps a quarter of the init image (A1111's 0.75);
#: inpainting repaints the masked area from noise (diffusers' default, 1.0).
DEFAULT_STRENGTH: dict[str, float] = {"img2img": 0.75, "inpaint": 1.0}


class BackendState(str, enum.Enum):
    READY = "ready"
    LOADING = "loading"
    #: Loaded, compiling the sizes of SD_COMPILE_SIZES (backends/local/speed.py); jobs wait for it.
    WARMING = "warming"
    UNAVAILABLE = "unavailable"
    ERROR = "error"
    NOT_CONFIGURED = "not_configured"


@dataclass(frozen=True)
class Availability:
    """A backend's state and its reason, without the rest of the health report (cheap: read before
    every job is admitted)."""

    state: BackendState
    reason: str

    @property
    def accepts_jobs(self) -> bool:
        """Not configured (no key) and unavailable (torch not installed) are the states only the
        operator can change: jobs are refused at once. Loading or failed backends take jobs (they
        wait for the load, or try it again)."""
        return self.state not in (BackendState.NOT_CONFIGURED, BackendState.UNAVAILABLE)


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
    #: LoRA adapters from SD_LORA_DIR (`loras` in requests); see docs/loras.md.
    supports_loras: bool = False
    output_formats: tuple[str, ...] = ("png", "jpeg", "webp")
    notes: tuple[str, ...] = ()
    #: What the model does (generation.Mode): images without a mask mean "edit" (references) where
    #: the model offers it, else "img2img"; a mask means "inpaint".
    modes: tuple[Mode, ...] = ("txt2img",)
    #: Most reference images in "edit" mode (img2img and inpaint take exactly one init image).
    max_input_images: int = 0

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
            "supports_loras": self.supports_loras,
            "output_formats": list(self.output_formats),
            "notes": list(self.notes),
            "modes": list(self.modes),
            "max_input_images": self.max_input_images,
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


#: A batch's live previews: (step, total steps, one encoded image or None per request of the batch).
#: The images are JPEG bytes (PREVIEW_MIME_TYPE), small: of the latent resolution.
PREVIEW_MIME_TYPE = "image/jpeg"
PreviewCallback = Callable[[int, int, Sequence[bytes | None]], None]


class RunContext:
    """Given to `generate`: progress reporting, live previews, cancellation and the deadline of a batch.

    Thread-safe; local backends call it from their device thread between denoising steps. Everything
    it carries out of the backend is plain data (step numbers, image bytes), so the same calls work
    whether the backend runs in this process or in another one (the device process, SD_DEVICE_ISOLATION).
    A backend that queues for a device of its own (`ImageBackend.reports_start`) calls `mark_started()`
    when the batch really has it: the engine counts the run deadline from then, and shows the jobs
    `running` only from then. Before that the deadline is infinite (`math.inf`).
    A backend whose call goes on after the device is done with the batch (the local backends finish the
    images on a thread of their own) calls `release_device()` then: the engine's lane hands the device
    the next batch while this one finishes (the call's end still decides the jobs' results).
    """

    def __init__(
        self,
        job_ids: Sequence[str],
        deadline: float = math.inf,
        on_progress: Callable[[int, int], None] | None = None,
        on_started: Callable[[], None] | None = None,
        *,
        on_preview: PreviewCallback | None = None,
        preview_interval: float = 0.0,
        on_released: Callable[[], None] | None = None,
    ) -> None:
        self.job_ids = list(job_ids)
        self.deadline = deadline
        self._on_progress = on_progress
        self._on_started = on_started
        self._on_preview = on_preview
        self._on_released = on_released
        self._released = False
        #: Seconds between two previews (0: no previews). The first comes after one interval.
        self.preview_interval = preview_interval
        self._last_preview = time.monotonic()
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

    def release_device(self) -> None:
        """The device is done with this batch (called once, from any thread; later calls do nothing)."""
        with self._lock:
            if self._released:
                return
            self._released = True
        if self._on_released is not None:
            self._on_released()

    @property
    def released(self) -> bool:
        return self._released

    def report_step(self, step: int, total: int) -> None:
        if self._on_progress is not None:
            self._on_progress(step, total)

    @property
    def wants_previews(self) -> bool:
        """Whether previews are asked for at all (a receiver and an interval above 0)."""
        return self._on_preview is not None and self.preview_interval > 0

    def preview_due(self, step: int, total: int) -> bool:
        """Whether to make a preview after this step: previews are wanted, one interval has passed since
        the last (or the start), and this is not the last step (the image itself comes next). A time
        rule, not a step count: its cost stays a small share of the device's time at any step rate."""
        if self._on_preview is None or self.preview_interval <= 0 or step >= total:
            return False
        return time.monotonic() - self._last_preview >= self.preview_interval

    def report_preview(self, step: int, total: int, previews: Sequence[bytes | None]) -> None:
        """One encoded image (or None) per request of the batch, in order."""
        self._last_preview = time.monotonic()
        if self._on_preview is not None:
            self._on_preview(step, total, list(previews))

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
    #: The LoRA folder, shared by the backends of one registry (set by the registry).
    lora_catalog: LoraCatalog | None = None

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    def capabilities_for(self, model: str) -> Capabilities:
        """What the backend accepts for one of its models. Backends whose models differ in sizes or
        defaults (sd serving SD 1.x and SDXL) override this; `resolve` validates against it."""
        return self.capabilities()

    def default_model_id(self) -> str:
        """The model a request naming none gets: the one chosen at runtime, else the first offered."""
        return self.default_model or self.capabilities().models[0]

    def model_for(self, requested: str | None) -> str:
        """The model a request gets: the one it names, which must be offered, or the default."""
        model = requested or self.default_model_id()
        offered = self.capabilities().models
        if model not in offered:
            raise InvalidParameterError(
                f"model is not available on backend '{self.id}'; available: {', '.join(offered)}", param="model"
            )
        return model

    @abc.abstractmethod
    def health(self) -> BackendHealth: ...

    def availability(self) -> Availability:
        """The state and its reason, as `health()` reports them. Backends whose full report costs
        something (memory probes) override this with a cheap answer."""
        health = self.health()
        return Availability(health.state, health.reason)

    def refresh(self) -> None:
        """Forget what was learnt from disk about the models (configs, cache state): A1111's
        refresh-checkpoints after a model was pulled into the cache. The allowlist itself is settings."""

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

    def lora_family(self, model: str) -> LoraFamily:
        """The LoRA family `model` takes (backends with supports_loras say; unknown: loading decides)."""
        return LoraFamily("unknown")

    def resolve_loras(self, loras: Sequence[LoraWeight], model: str) -> tuple[LoraWeight, ...]:
        """Check the LoRAs asked for against the service limits, the folder and the model's family.

        Each is a 422 naming `loras`: a backend without LoRA support, more than SD_MAX_LORAS, a name
        twice, a name that is not a .safetensors file in SD_LORA_DIR, or a LoRA of another family
        than the model's (naming both). Nothing is loaded here."""
        if not loras:
            return ()
        if not self.capabilities_for(model).supports_loras:
            raise InvalidParameterError(f"backend '{self.id}' does not take LoRAs", param="loras")
        limit = self.settings.max_loras
        if len(loras) > limit:
            raise InvalidParameterError(f"at most {limit} LoRAs per request (SD_MAX_LORAS)", param="loras")
        catalog = self.lora_catalog or LoraCatalog(self.settings.lora_folder)
        target = self.lora_family(model)
        seen: set[str] = set()
        for lora in loras:
            if not -10.0 <= lora.weight <= 10.0:  # also refuses NaN
                raise InvalidParameterError("each LoRA weight must be between -10 and 10", param="loras")
            entry = catalog.get(lora.name)  # unknown, escaping or not safetensors: 422
            if lora.name in seen:
                raise InvalidParameterError(f"LoRA '{lora.name}' is listed twice", param="loras")
            seen.add(lora.name)
            if entry.header.family.fits(target) is False:
                raise InvalidParameterError(
                    f"LoRA '{lora.name}' is for {entry.header.family.label}, but model '{model}' on backend "
                    f"'{self.id}' is {target.label}",
                    param="loras",
                )
        return tuple(loras)

    # -- validation ----------------------------------------------------------------------------
    def resolve(self, params: GenerationParams) -> GenerationRequest:
        """Validate loose parameters against this backend and the service limits; fill defaults.

        Raises InvalidParameterError naming the parameter. Nothing here touches the model."""
        settings = self.settings
        ignored: list[str] = []

        model = self.model_for(params.model)
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

        mode = self.mode_for(params, caps, model)
        max_width = min(caps.max_width, settings.max_width)
        max_height = min(caps.max_height, settings.max_height)
        max_pixels = min(caps.max_pixels, settings.max_pixels)
        default_width, default_height = caps.default_width, caps.default_height
        if params.images:
            # The output follows the first image (never silently the model's native size).
            default_width, default_height = size_like(
                params.images[0].width, params.images[0].height, caps, max_width, max_height, max_pixels
            )
        width = default_width if params.width is None else params.width
        height = default_height if params.height is None else params.height
        for name, value, upper in (("width", width, max_width), ("height", height, max_height)):
            if value < caps.min_size:
                raise InvalidParameterError(f"{name} must be at least {caps.min_size}", param=name)
            if value > upper:
                raise InvalidParameterError(f"{name} must be at most {upper}", param=name)
            if value % caps.size_multiple:
                raise InvalidParameterError(
                    f"{name} must be a multiple of {caps.size_multiple} for backend '{self.id}'", param=name
                )
        require_pixels(width, height, max_pixels, context=" (SD_MAX_PIXELS)")

        steps: int | None
        if caps.default_steps is None:
            steps = None
            if params.steps is not None:
                ignored.append("steps")
        else:
            steps = caps.default_steps if params.steps is None else params.steps
            require_between("steps", steps, 1, min(caps.max_steps, settings.max_steps))

        guidance: float | None
        if caps.supports_guidance:
            guidance = caps.default_guidance if params.guidance_scale is None else params.guidance_scale
            if guidance is not None:
                require_between("guidance_scale", guidance, 0.0, 30.0)
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

        strength = self.strength_for(params, mode, steps, ignored)

        require_between("num_images", params.num_images, 1, settings.max_images, context=" (SD_MAX_IMAGES)")
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
            loras=self.resolve_loras(params.loras, model),
            backend_options=dict(params.backend_options),
            mode=mode,
            images=params.images,
            mask=params.mask,
            strength=strength,
            resize_mode=params.resize_mode,
        )

    def mode_for(self, params: GenerationParams, caps: Capabilities, model: str) -> Mode:
        """What the request's images mean on this model, checked against what the model offers:
        a mode it cannot do is a 422 naming the mode and the model."""
        images, mask = params.images, params.mask
        mode: Mode
        if not images:
            if mask is not None:
                raise InvalidParameterError("a mask needs the image it applies to (images[0])", param="mask")
            mode = "txt2img"
        elif mask is not None:
            mode = "inpaint"
        else:
            mode = "edit" if "edit" in caps.modes else "img2img"
        if mode not in caps.modes:
            raise InvalidParameterError(
                f"mode '{mode}' is not available on model '{model}' of backend '{self.id}'; "
                f"its modes: {', '.join(caps.modes)}",
                param="prompt" if mode == "txt2img" else "mask" if mode == "inpaint" else "images",
            )
        count = len(images)
        if count > self.settings.max_input_images:
            raise InvalidParameterError(
                f"at most {self.settings.max_input_images} input images per request (SD_MAX_INPUT_IMAGES)",
                param="images",
            )
        if mode in ("img2img", "inpaint") and count != 1:
            raise InvalidParameterError(
                f"mode '{mode}' takes one init image on model '{model}' of backend '{self.id}', not {count}",
                param="images",
            )
        if mode == "edit" and count > caps.max_input_images:
            raise InvalidParameterError(
                f"model '{model}' of backend '{self.id}' takes at most {caps.max_input_images} reference images",
                param="images",
            )
        if mask is not None and (mask.width, mask.height) != (images[0].width, images[0].height):
            raise InvalidParameterError(
                f"mask must be the size of images[0] ({images[0].width}x{images[0].height}), "
                f"not {mask.width}x{mask.height}",
                param="mask",
            )
        return mode

    @staticmethod
    def strength_for(params: GenerationParams, mode: Mode, steps: int | None, ignored: list[str]) -> float | None:
        """The strength of an img2img or inpaint request (None in the other modes, where it is ignored).
        The pipeline runs int(steps x strength) steps: fewer than one is a 422, not a crash."""
        if mode not in DEFAULT_STRENGTH:
            if params.strength is not None:
                ignored.append("strength")
            return None
        strength = DEFAULT_STRENGTH[mode] if params.strength is None else params.strength
        if not 0 < strength <= 1:
            raise InvalidParameterError("strength must be greater than 0 and at most 1", param="strength")
        if steps is not None and int(steps * strength) < 1:
            raise InvalidParameterError(
                f"steps x strength must give at least one denoising step ({steps} x {strength:g} gives "
                f"{int(steps * strength)}): raise strength or steps",
                param="strength",
            )
        return strength


def size_like(
    width: int, height: int, caps: Capabilities, max_width: int, max_height: int, max_pixels: int
) -> tuple[int, int]:
    """An output size for an input image of width x height: the same aspect ratio, scaled down only
    as far as the limits require, each side rounded down to the model's size multiple."""
    scale = min(1.0, max_width / width, max_height / height, math.sqrt(max_pixels / (width * height)))
    multiple = caps.size_multiple
    low = -(-caps.min_size // multiple) * multiple

    def side(value: int) -> int:
        return max(low, int(value * scale) // multiple * multiple)

    return side(width), side(height)
