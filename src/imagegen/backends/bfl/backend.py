"""The `flux-api` backend: FLUX through the Black Forest Labs cloud API.

One image is one BFL task: submit, poll its `polling_url` until it is final, download the result at
once (the URL expires), decode it and hand it to the engine, which stores it like every other output.

Images (docs/editing.md): FLUX.2 models edit with reference images (`input_image`, `input_image_2`...,
as many as each model takes), Kontext with one; a mask sends the request to FLUX.1 Fill [pro]
(`flux-pro-1.0-fill`), whatever FLUX model was chosen. Inputs leave as PNGs re-encoded from their
pixels (nothing of the uploaded file's metadata is forwarded), references scaled to at most 4 MP.

Concurrency: the engine runs up to SD_BFL_MAX_ACTIVE_TASKS jobs at once on this backend's own lane,
and a job may need several tasks, so the backend also holds one slot per active task (a semaphore of
the same size): BFL never sees more active tasks than the limit from this service, and never answers
429 because of it. A task abandoned while still running at BFL (cancel, deadline) keeps its slot until
BFL reports it finished, because BFL still counts it.

No torch here: this backend must stay importable and cheap on a machine without local models.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from imagegen import metrics
from imagegen.backends import conditioning
from imagegen.backends.base import (
    Availability,
    BackendHealth,
    BackendState,
    Capabilities,
    ImageBackend,
    RunContext,
    size_like,
)
from imagegen.backends.bfl.client import (
    FINAL_STATUSES,
    KEY_REJECTED,
    OUT_OF_CREDITS,
    BflClient,
    Submission,
    parse_progress,
    raise_for_final_status,
)
from imagegen.backends.bfl.health import KeyMonitor
from imagegen.backends.bfl.models import (
    FILL,
    FILL_MODEL,
    FOUR_MP,
    MODELS,
    BflModelRules,
    aspect_ratio,
    check_request,
    rules_for,
)
from imagegen.config import Backend, Settings
from imagegen.errors import (
    BackendNotConfiguredError,
    ContentModeratedError,
    DeadlineExceededError,
    InvalidParameterError,
    JobCancelledError,
    PaymentRequiredError,
    ServiceError,
    UpstreamError,
)
from imagegen.generation import GeneratedImage, GenerationParams, GenerationRequest, Mode
from imagegen.storage.inputs import InputStore

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger("imagegen.backends.bfl.backend")

#: Results are at most about 4 MP; anything far beyond is not an answer to our request.
MAX_RESULT_PIXELS = 4 * FOUR_MP
_OPTIONS = ("safety_tolerance",)


@dataclass(frozen=True)
class _Deadline:
    """When one image must be done, and which setting set that time (for the 504's message)."""

    at: float  # time.monotonic()
    setting: str

    @classmethod
    def for_task(cls, ctx: RunContext, bfl_timeout: float) -> _Deadline:
        own = time.monotonic() + bfl_timeout
        if ctx.deadline < own:
            return cls(ctx.deadline, "SD_JOB_TIMEOUT")
        return cls(own, "SD_BFL_TIMEOUT")

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def error(self, doing: str) -> DeadlineExceededError:
        return DeadlineExceededError(f"the deadline ({self.setting}) passed while {doing}")


class _Slot:
    """One active BFL task's place under the limits; released exactly once."""

    def __init__(self, backend: FluxApiBackend, semaphores: list[asyncio.Semaphore]) -> None:
        self._backend = backend
        self._semaphores = semaphores
        self._released = False
        backend.active_tasks += 1
        backend.max_active_seen = max(backend.max_active_seen, backend.active_tasks)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._backend.active_tasks -= 1
        for semaphore in reversed(self._semaphores):
            semaphore.release()


def _png_b64(image: Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # pixels only: no metadata travels
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data: bytes) -> Image:
    """Bytes from BFL as a loaded PIL image; anything else is an upstream error (never a 500)."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        # open() reads only the header: format and size are checked before any pixel is decoded.
        image = PILImage.open(io.BytesIO(data), formats=("PNG", "JPEG", "WEBP"))
        if image.width * image.height > MAX_RESULT_PIXELS:
            raise UpstreamError("BFL returned an image far larger than requested; refused")
        # load() decodes every pixel and raises on truncated or corrupt data (no separate verify(),
        # which would decode the whole image a second time).
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, PILImage.DecompressionBombError):
        raise UpstreamError("BFL returned a result that is not a valid PNG, JPEG or WebP image") from None
    return image


def bfl_error_kind(error: ServiceError) -> str:
    """The metric kind of an error of this backend: the raise site's tag, else the error's class."""
    if error.cause_kind:
        return error.cause_kind
    by_class: tuple[tuple[type[ServiceError], str], ...] = (
        (PaymentRequiredError, "credits"),
        (ContentModeratedError, "moderated"),
        (InvalidParameterError, "invalid_request"),
        (DeadlineExceededError, "timeout"),
        (UpstreamError, "bad_response"),
    )
    for error_class, kind in by_class:
        if isinstance(error, error_class):
            return kind
    return "other"


class FluxApiBackend(ImageBackend):
    id = Backend.FLUX_API.value
    lane = Backend.FLUX_API.value

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        limit = settings.bfl_max_active_tasks
        self.concurrency = limit
        allowed = list(settings.bfl_models) or list(MODELS)
        self.models: tuple[str, ...] = (settings.bfl_model, *[name for name in allowed if name != settings.bfl_model])
        self._slots = asyncio.Semaphore(limit)
        self._model_slots = {
            name: asyncio.Semaphore(min(rules.max_active, limit))
            for name, rules in MODELS.items()
            if rules.max_active is not None and rules.max_active < limit
        }
        self.active_tasks = 0
        self.max_active_seen = 0
        self._client: BflClient | None = None
        self._key: KeyMonitor | None = None
        if settings.bfl_api_key is not None:
            self._client = BflClient(
                api_url=settings.bfl_api_url,
                api_key=settings.bfl_api_key,
                request_timeout=settings.bfl_request_timeout,
                max_retries=settings.bfl_max_retries,
                retry_backoff=settings.bfl_retry_backoff,
                on_key_status=lambda status: self._key.learn(status) if self._key is not None else None,
            )
            self._key = KeyMonitor(
                self._client,
                enabled=settings.bfl_key_check,
                interval=settings.bfl_key_check_interval,
                timeout=min(10.0, settings.bfl_request_timeout),
            )
        self._background: set[asyncio.Task[Any]] = set()
        self._inputs: InputStore | None = None

    @property
    def inputs(self) -> InputStore:
        if self._inputs is None:
            self._inputs = InputStore(self.settings.inputs_dir)
        return self._inputs

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._key is not None:
            self._key.attach(asyncio.get_running_loop())

    async def close(self) -> None:
        if self._key is not None:
            await self._key.close()
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    # -- description -----------------------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        # Backend-wide bounds (the loosest of the models); `resolve` applies the chosen model's rules.
        return Capabilities(
            models=self.models,
            default_width=1024,
            default_height=1024,
            size_multiple=16,
            min_size=64,
            max_width=4096,
            max_height=4096,
            max_pixels=FOUR_MP,
            default_steps=None,
            max_steps=50,
            max_batch=1,  # one image is one BFL task: merging jobs would gain nothing
            supports_negative_prompt=False,
            supports_guidance=False,
            default_guidance=None,
            output_formats=("png", "jpeg", "webp"),
            modes=("txt2img", "edit", "inpaint"),
            max_input_images=max(MODELS[name].max_references for name in self.models),
            notes=(
                "images: reference images for the models that take them (max_reference_images in bfl_models); "
                f"a mask goes to {FILL_MODEL} (FLUX.1 Fill [pro])",
                "each model has its own rules: see bfl_models in GET /api/backends",
                "FLUX.2: sizes are multiples of 16; FLUX.1: multiples of 32 in 256..1440",
                "steps and guidance_scale apply to flux-2-flex, flux-pro and flux-dev only",
                "aspect_ratio models (kontext, ultra) take the ratio of width and height; BFL picks the size",
                "safety_tolerance: 0 (strictest) .. 5 on FLUX.2, .. 6 on FLUX.1",
            ),
        )

    def capabilities_for(self, model: str) -> Capabilities:
        """The backend's bounds with this model's modes: references where it takes them, and
        inpainting through the fill endpoint for every model."""
        rules = MODELS[model]
        caps = self.capabilities()
        modes: tuple[Mode, ...] = ("txt2img", "edit", "inpaint") if rules.max_references else ("txt2img", "inpaint")
        return dataclasses.replace(caps, modes=modes, max_input_images=rules.max_references)

    def info(self) -> dict[str, Any]:
        return {
            "bfl_api_host": self._api_host(),
            "bfl_max_active_tasks": self.settings.bfl_max_active_tasks,
            "bfl_models": {name: MODELS[name].to_dict() for name in self.models},
        }

    def _api_host(self) -> str:
        return urlsplit(self.settings.bfl_api_url).netloc

    # -- health: never network I/O here; the key check runs in the background (bfl/health.py) -------
    def availability(self) -> Availability:
        if self._key is None:
            return Availability(BackendState.NOT_CONFIGURED, "SD_BFL_API_KEY is not set")
        state = self._key.current().state
        if state == "rejected":
            # A misconfiguration only the operator can fix: not ready, like a model that failed to load.
            return Availability(BackendState.ERROR, KEY_REJECTED)
        if state == "no_credits":
            # Every request would answer 402 until the account is topped up: not ready (a readiness probe
            # takes it out of rotation while it is the default). Jobs are still taken: the next key check,
            # or a request that BFL accepts, sees the credits back.
            return Availability(
                BackendState.ERROR,
                f"{OUT_OF_CREDITS}: add credits at https://api.bfl.ai/ (requests answer 402 until then)",
            )
        return Availability(BackendState.READY, f"BFL API at {self._api_host()}")

    def health(self) -> BackendHealth:
        model = self.settings.bfl_model
        available = self.availability()
        if self._key is None:
            return BackendHealth(available.state, available.reason, model=model, device="cloud")
        check = self._key.current()
        details: dict[str, Any] = {
            "api_host": self._api_host(),
            "active_tasks": self.active_tasks,
            "max_active_tasks": self.settings.bfl_max_active_tasks,
            "key_check": check.state,
            "credits": check.credits,
        }
        if check.checked_at is not None:
            details["key_checked_seconds_ago"] = round(time.monotonic() - check.checked_at, 1)
        host = details["api_host"]
        if available.state is not BackendState.READY:  # the key was rejected, or the account is empty
            return BackendHealth(available.state, available.reason, model=model, device="cloud", details=details)
        # Everything else stays ready: a flaky or missing credits call is no reason to take the service
        # out of rotation; requests then answer their own error.
        reason = {
            "ok": f"BFL API at {host}" + (f"; {check.credits:g} credits" if check.credits is not None else ""),
            "unchecked": f"BFL API at {host}; key not checked yet",
            "disabled": f"BFL API at {host}; key not checked (SD_BFL_KEY_CHECK=false)",
            "unsupported": f"BFL API at {host}; this endpoint offers no key check",
            "unreachable": f"BFL API at {host}; the last key check failed ({check.detail}); will retry",
        }.get(check.state, f"BFL API at {host}")
        return BackendHealth(BackendState.READY, reason, model=model, device="cloud", details=details)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- validation ------------------------------------------------------------------------------
    def resolve(self, params: GenerationParams) -> GenerationRequest:
        """The service-wide checks (base class), then the chosen BFL model's own rules; a mask makes it
        a request to the fill endpoint, with the fill endpoint's rules."""
        if params.mask is not None and params.images and params.width is None and params.height is None:
            # Fill answers at the image's size: the image's own, within fill's bounds.
            image = params.images[0]
            caps = dataclasses.replace(self.capabilities(), size_multiple=FILL.size_multiple, min_size=FILL.min_size)
            width, height = size_like(image.width, image.height, caps, FILL.max_size, FILL.max_size, FILL.max_pixels)
            params = params.model_copy(update={"width": width, "height": height})
        request = super().resolve(params)
        fill = request.mode == "inpaint"
        rules = FILL if fill else MODELS[request.model]
        unknown = sorted(set(params.backend_options) - set(_OPTIONS))
        if unknown:
            raise InvalidParameterError(f"unknown flux-api option '{unknown[0]}'", param=unknown[0])
        checked = check_request(
            rules,
            width=request.width,
            height=request.height,
            steps=params.steps,
            guidance=params.guidance_scale,
            safety_tolerance=params.backend_options.get("safety_tolerance"),
            default_safety_tolerance=self.settings.bfl_safety_tolerance,
            max_steps=self.settings.max_steps,
        )
        ignored = [name for name in request.ignored if name not in ("steps", "guidance_scale")]
        update: dict[str, Any] = {
            "steps": checked.steps,
            "guidance_scale": checked.guidance,
            "ignored": (*ignored, *checked.ignored),
            "backend_options": {"safety_tolerance": checked.safety_tolerance},
        }
        if fill:
            # Fill takes no strength: the masked area is repainted.
            update.update(model=FILL_MODEL, strength=None)
            if params.strength is not None:
                update["ignored"] = (*update["ignored"], "strength")
        return request.model_copy(update=update)

    def payload(self, request: GenerationRequest, seed: int, images: dict[str, str] | None = None) -> dict[str, Any]:
        """The JSON body of `POST /v1/<model>` for one image; `images` the encoded inputs (see encode_inputs)."""
        rules = rules_for(request.model)
        body: dict[str, Any] = {
            "prompt": request.prompt,
            "seed": seed,
            "safety_tolerance": int(request.backend_options["safety_tolerance"]),  # resolve() always sets it
            "output_format": self._bfl_format(request.output_format),
            **(images or {}),
        }
        if rules is FILL:
            pass  # fill answers at the image's size: no size field
        elif rules.size_mode == "size":
            body.update(width=request.width, height=request.height)
        else:
            body["aspect_ratio"] = aspect_ratio(request.width, request.height)
        if rules.steps is not None and request.steps is not None:
            body["steps"] = request.steps
        if rules.guidance is not None and request.guidance_scale is not None:
            body["guidance"] = request.guidance_scale
        return body

    def _bfl_format(self, output_format: str) -> str:
        # BFL delivers jpeg or png; the engine re-encodes to the requested format. png for png/webp
        # requests keeps that re-encoding lossless.
        if self.settings.bfl_output_format != "auto":
            return self.settings.bfl_output_format
        return "jpeg" if output_format == "jpeg" else "png"

    # -- generation ------------------------------------------------------------------------------
    async def generate(self, batch: Sequence[GenerationRequest], ctx: RunContext) -> list[list[GeneratedImage]]:
        if self._client is None:
            raise BackendNotConfiguredError(
                "backend 'flux-api' is not configured: SD_BFL_API_KEY is not set", param="backend"
            )
        fractions: list[float] = []
        reported = [-1]

        def progress_of(index: int) -> Callable[[float], None]:
            def update(fraction: float) -> None:
                fractions[index] = fraction
                step = round(100 * sum(fractions) / len(fractions))
                if step != reported[0]:
                    reported[0] = step
                    ctx.report_step(step, 100)

            return update

        jobs = []
        shape = []
        for request in batch:
            shape.append(len(request.seeds))
            # Read, fit and encoded once per request, in a worker thread: every task sends the same.
            encoded = {} if request.mode == "txt2img" else await asyncio.to_thread(self.encode_inputs, request)
            for seed in request.seeds:
                fractions.append(0.0)
                jobs.append(self._one_image(request, seed, ctx, progress_of(len(fractions) - 1), encoded))
        # Every image of every request runs at once (each waits for its own slot); the first failure
        # fails the batch and stops the others.
        tasks = [asyncio.ensure_future(job) for job in jobs]
        try:
            images = await asyncio.gather(*tasks)
        except BaseException as error:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if isinstance(error, ServiceError) and not isinstance(error, JobCancelledError):
                metrics.record_bfl_error(bfl_error_kind(error))
            raise
        results, start = [], 0
        for count in shape:
            results.append(list(images[start : start + count]))
            start += count
        return results

    def encode_inputs(self, request: GenerationRequest) -> dict[str, str]:
        """The request's images as the endpoint's fields, base64 PNGs re-encoded from their pixels:
        fill's `image` and `mask` at the output size; the references as `input_image`, `input_image_2`...
        scaled to at most 4 MP (the size BFL works at)."""
        if request.mode == "txt2img":
            return {}
        inputs = conditioning.load(self.inputs, request)
        if request.mode == "inpaint":
            assert inputs.init is not None and inputs.mask is not None
            return {"image": _png_b64(inputs.init), "mask": _png_b64(inputs.mask)}
        fields = rules_for(request.model).reference_fields
        encoded = {}
        for name, image in zip(fields, inputs.references, strict=False):
            if image.width * image.height > FOUR_MP:
                scale = (FOUR_MP / (image.width * image.height)) ** 0.5
                image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
            encoded[name] = _png_b64(image)
        return encoded

    async def _one_image(
        self,
        request: GenerationRequest,
        seed: int,
        ctx: RunContext,
        progress: Callable[[float], None],
        images: dict[str, str],
    ) -> GeneratedImage:
        assert self._client is not None
        client = self._client
        rules = rules_for(request.model)
        deadline = _Deadline.for_task(ctx, self.settings.bfl_timeout)
        slot = await self._acquire_slot(rules, ctx, deadline)
        submission: Submission | None = None
        try:
            ctx.check()  # cancelled while waiting for a slot: spend no credits
            submission = await client.submit(request.model, self.payload(request, seed, images), deadline=deadline.at)
            final = await self._wait_final(client, submission, ctx, deadline, progress)
        except BaseException:
            if submission is None:
                slot.release()
            else:
                self._keep_slot_until_final(client, submission, slot)
            raise
        slot.release()  # BFL no longer counts the task: the next one may start while this downloads
        result = raise_for_final_status(final, submission.task_id, client.scrub)
        progress(1.0)
        data = await client.download(
            # The result is ready and paid for: its download gets a full request timeout even if the
            # task's own deadline is nearly spent (the job's deadline still bounds it in the engine).
            result["sample"],
            deadline=max(deadline.at, time.monotonic() + self.settings.bfl_request_timeout),
            max_bytes=self.settings.bfl_max_download_bytes,
        )
        image = await asyncio.to_thread(decode_image, data)
        bfl_seed = result.get("seed")
        info: dict[str, Any] = {"bfl_task_id": submission.task_id}
        if isinstance(bfl_seed, int) and not isinstance(bfl_seed, bool):
            info["bfl_seed"] = bfl_seed
        if submission.cost is not None:
            info["bfl_cost"] = submission.cost
        log.info("bfl task=%s ready model=%s seed=%s", submission.task_id, request.model, info.get("bfl_seed", seed))
        return GeneratedImage(seed=info.get("bfl_seed", seed), image=image, info=info)

    async def _acquire_slot(self, rules: BflModelRules, ctx: RunContext, deadline: _Deadline) -> _Slot:
        semaphores = [self._model_slots[rules.name]] if rules.name in self._model_slots else []
        semaphores.append(self._slots)
        held: list[asyncio.Semaphore] = []
        try:
            for semaphore in semaphores:
                while True:
                    remaining = deadline.remaining()
                    if remaining <= 0:
                        raise deadline.error("waiting for a free BFL task slot")
                    try:
                        # Short waits so that a cancelled job stops waiting promptly.
                        async with asyncio.timeout(min(remaining, 0.25)):
                            await semaphore.acquire()
                        break
                    except TimeoutError:
                        ctx.check()
                held.append(semaphore)
        except BaseException:
            for semaphore in reversed(held):
                semaphore.release()
            raise
        return _Slot(self, semaphores)

    async def _wait_final(
        self,
        client: BflClient,
        submission: Submission,
        ctx: RunContext,
        deadline: _Deadline,
        progress: Callable[[float], None],
    ) -> dict[str, Any]:
        """Poll until BFL reports a final status; return that body.

        Pauses start at SD_BFL_POLL_INTERVAL and grow to SD_BFL_POLL_MAX_INTERVAL; when BFL reports
        progress, the next poll is aimed at the estimated finish instead (never sooner than a quarter
        of the first interval), so a result is picked up soon after it is ready. An aimed poll that
        finds the task still running is followed by a plain backoff pause: progress that stalls near
        the end cannot make the client poll BFL ever faster."""
        first = self.settings.bfl_poll_interval
        ceiling = max(first, self.settings.bfl_poll_max_interval)
        backoff = pause = first
        aimed = False
        while True:
            remaining = deadline.remaining()
            if remaining <= 0:
                raise deadline.error(f"waiting for BFL task {submission.task_id}")
            await asyncio.sleep(min(pause, remaining))
            ctx.check()
            if deadline.remaining() <= 0:
                raise deadline.error(f"waiting for BFL task {submission.task_id}")
            body = await client.poll(submission, deadline=deadline.at)
            if body["status"] in FINAL_STATUSES:
                return body
            backoff = min(backoff * 1.5, ceiling)
            pause = backoff
            fraction = parse_progress(body.get("progress"))
            if fraction is not None:
                progress(fraction)
            if fraction is not None and 0 < fraction < 1 and not aimed:
                elapsed = time.monotonic() - submission.submitted_at
                estimate = elapsed * (1 - fraction) / fraction
                pause = min(backoff, max(first / 4, estimate + 0.01))
                aimed = pause < backoff
            else:
                aimed = False

    def _keep_slot_until_final(self, client: BflClient, submission: Submission, slot: _Slot) -> None:
        """The job gave up on a task that may still run at BFL: keep counting it until BFL says it ended
        (or SD_BFL_TIMEOUT passes), so later tasks cannot push BFL over its active-task limit."""

        async def watch() -> None:
            watch_deadline = time.monotonic() + self.settings.bfl_timeout
            try:
                while time.monotonic() < watch_deadline:
                    await asyncio.sleep(max(self.settings.bfl_poll_interval, self.settings.bfl_poll_max_interval))
                    try:
                        body = await client.poll(submission, deadline=watch_deadline)
                    except ServiceError:
                        return  # BFL cannot tell us any more (gone, key rejected): stop counting it
                    if body["status"] in FINAL_STATUSES:
                        return
            finally:
                slot.release()

        try:
            self._spawn(watch())
        except RuntimeError:  # no running loop any more
            slot.release()
