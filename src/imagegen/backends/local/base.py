"""What the local diffusers backends (`sd`, `flux-local`) share: background loading with a state
visible in /health, one pipeline call at a time, generation in a worker thread, OOM handling,
progress and cancellation between denoising steps, the safety checker and unloading. The
DeviceManager (device_manager.py) decides which of them stay loaded on the shared device.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import importlib.util
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from imagegen import metrics
from imagegen.backends import conditioning
from imagegen.backends.base import Availability, BackendHealth, BackendState, ImageBackend, RunContext
from imagegen.backends.conditioning import Conditioning
from imagegen.backends.local.device_manager import DeviceManager
from imagegen.config import Settings
from imagegen.errors import (
    BackendNotConfiguredError,
    BackendUnavailableError,
    GenerationFailedError,
    OutOfMemoryError,
    ServiceError,
)
from imagegen.generation import GeneratedImage, GenerationRequest, LoraWeight
from imagegen.storage.inputs import InputStore
from imagegen.storage.loras import LoraCatalog

if TYPE_CHECKING:
    from imagegen.backends.local.finisher import HostImages
    from imagegen.backends.local.loras import AdapterSet
    from imagegen.backends.local.speed import SpeedModes

log = logging.getLogger("imagegen.backends")

#: diffusers' `callback_on_step_end(pipe, step, timestep, callback_kwargs) -> callback_kwargs`.
StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]

#: After a failed load, requests fail fast with the reason; a new load is tried after this delay.
RELOAD_AFTER_FAILURE_SECONDS = 30.0

P = ParamSpec("P")
T = TypeVar("T")


class LoadState(str, enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    WARMING = "warming"  # loaded; compiling the sizes of SD_COMPILE_SIZES on the device thread (speed.py)
    READY = "ready"
    FAILED = "failed"


DEPS_MISSING = "torch/diffusers are not installed (install the 'local' extra with `make install`)"


class LoadedPipeline:
    """A loaded pipeline and what was decided while loading it."""

    def __init__(self, pipe: Any, device: str, dtype: Any, safety: Any, details: dict[str, Any]) -> None:
        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.safety = safety
        self.details = details
        #: The LoRA adapters loaded into this pipeline (backends/local/loras.py), made on first use;
        #: they go when the pipeline goes.
        self.adapters: AdapterSet | None = None
        #: Pipelines for the other modes (img2img, inpaint), made from this one on first use: they
        #: share its components (from_pipe), so they cost no second copy of the weights.
        self.derived: dict[str, Any] = {}
        #: latents -> preview images, fitted on this pipeline's VAE (backends/local/previews.py); None: off
        self.previewer: Any = None


class DeviceThread(Executor):
    """One daemon thread that runs the calls submitted to it, in order.

    A daemon thread, unlike ThreadPoolExecutor's (joined at interpreter exit): a pipeline call that
    never returns must not keep the process from exiting once the service has stopped."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        self._calls.put((future, functools.partial(fn, *args, **kwargs)))
        return future

    def _run(self) -> None:
        while True:
            future, call = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = call()
            except BaseException as error:  # noqa: BLE001 - handed to the caller through its future
                future.set_exception(error)
            else:
                future.set_result(result)
            del future, call


_device_executor: DeviceThread | None = None
_device_executor_lock = threading.Lock()


def device_executor() -> DeviceThread:
    """The one thread that runs every local pipeline call of this process.

    The local backends share the device and the engine runs one call at a time on it; running
    them all on the same thread also keeps one OpenMP/intra-op thread team warm, where alternating
    threads would each spin up (and spin-wait in) a team of their own."""
    global _device_executor
    with _device_executor_lock:
        if _device_executor is None:
            _device_executor = DeviceThread("imagegen-device")
        return _device_executor


_finisher_executor: DeviceThread | None = None


def finisher_executor() -> DeviceThread:
    """The one thread that finishes the local backends' batches off the device thread: waits for the
    copy of the pixels to the host, numpy -> PIL, the split into GeneratedImage (finisher.py)."""
    global _finisher_executor
    with _device_executor_lock:
        if _finisher_executor is None:
            _finisher_executor = DeviceThread("imagegen-finisher")
        return _finisher_executor


#: How long the answer to "are the model's files in the cache?" is reused (availability is read for
#: every job admitted and every /health probe; `imagegen models pull` may fill the cache meanwhile).
CACHE_CHECK_SECONDS = 2.0


class LocalPipelineBackend(ImageBackend):
    lane = "local"
    concurrency = 1
    reports_start = True  # a batch may wait for the device (a load, the other backend's call)
    runs_on_device = True
    #: Whether the model needs the standalone safety checker (SD_SAFETY_CHECKER_ID); None: its own
    #: model_index.json says (SD 1.x models ship a checker of their own).
    standalone_checker: bool | None = None

    def __init__(self, settings: Settings, model_id: str) -> None:
        super().__init__(settings)
        self.model_id = model_id
        self._lock = threading.RLock()  # held while loading, unloading and for every pipeline call
        self._state = LoadState.UNLOADED
        self._loaded: LoadedPipeline | None = None
        self._failure: str | None = None
        self._failed_at = 0.0
        self._load_seconds: float | None = None
        self._loader: threading.Thread | None = None
        self._deps_missing = importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("torch") is None
        self.device_manager: DeviceManager | None = None
        self._last_used = 0.0  # monotonic time of the last load or pipeline call
        self._last_unload: tuple[str, float] | None = None  # (reason, monotonic time)
        self._unloads = 0
        # What loads elsewhere decided, by model: a parent-side instance that never loads itself
        # (device isolation) learns native sizes and pipeline classes from the device process.
        self._reported_details: dict[str, dict[str, Any]] = {}
        #: Called (from any thread) right after the load state changes: a load begins, ends or
        #: fails, a pipeline is unloaded. The device process reports health from it.
        self.on_change: Callable[[], None] | None = None
        self._inputs: InputStore | None = None
        self._uncached: tuple[str, float, list[str]] | None = None  # (model, monotonic time, missing repos)
        self._speed: SpeedModes | None = None  # SD_COMPILE / SD_QUANTIZE of the last load (speed.py)

    def attach_device_manager(self, manager: DeviceManager) -> None:
        """Share the device with the other local backends of this app (see device_manager.py)."""
        self.device_manager = manager

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    @property
    def dependencies_missing(self) -> bool:
        """torch or diffusers cannot be imported here: the backend cannot run (health says why)."""
        return self._deps_missing

    def load_details(self, model: str) -> dict[str, Any] | None:
        """What loading `model` decided (pipeline class, native size, profile...): from the pipeline
        loaded here, else as reported by the device process that loaded it; None while unknown."""
        loaded = self._loaded  # read once: the device manager may unload it from another thread
        if loaded is not None and model == self.model_id:
            return loaded.details
        return self._reported_details.get(model)

    def shareable_load_details(self) -> tuple[str, dict[str, Any]] | None:
        """(model, details) of the loaded pipeline as plain values another process can hold (the
        scheduler's config stays here: it is large and only a pipeline call needs it)."""
        loaded = self._loaded
        if loaded is None:
            return None
        return self.model_id, {key: value for key, value in loaded.details.items() if key != "scheduler_config"}

    def adopt_load_details(self, model: str, details: dict[str, Any]) -> None:
        """Remember what a device process's load of `model` decided (see `load_details`)."""
        self._reported_details[model] = dict(details)

    @property
    def last_used(self) -> float:
        return self._last_used

    # -- to implement ----------------------------------------------------------------------------
    def load_pipeline(self) -> LoadedPipeline:
        """Load the pipeline onto its device (runs in a background or worker thread)."""
        raise NotImplementedError

    def run_pipeline(
        self, loaded: LoadedPipeline, batch: Sequence[GenerationRequest], ctx: RunContext, inputs: Conditioning
    ) -> Any:
        """One pipeline call for the whole batch; returns the decoded images as a tensor on the device
        (N, 3, H, W) in [0, 1] (`output_type="pt"`), or host float images (N, H, W, 3) in [0, 1]. A batch
        shares its conditioning (the batch key holds the mode, strength and input hashes): `inputs`."""
        raise NotImplementedError

    @property
    def inputs(self) -> InputStore:
        """The input store of SD_DATA_DIR, where a request's images are read from."""
        if self._inputs is None:
            self._inputs = InputStore(self.settings.inputs_dir)
        return self._inputs

    def preview_layout(self, loaded: LoadedPipeline) -> str | None:
        """How the pipeline's denoising loop lays out its latents (previews.SD, FLUX1, FLUX2); None: no
        previews for it."""
        return None

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        # The device manager is started by the registry that owns it, once for all local backends.
        if self.preload and not self._deps_missing:
            self.begin_load()

    def begin_load(self) -> None:
        """Start loading in a background thread (no-op if loaded or loading)."""
        with self._lock:
            if self._state in (LoadState.READY, LoadState.LOADING):
                return
            self._state = LoadState.LOADING
        self._changed()
        self._loader = threading.Thread(target=self._load_in_background, name=f"load-{self.id}", daemon=True)
        self._loader.start()

    def _load_in_background(self) -> None:
        try:
            self.ensure_loaded(force=True)
        except ServiceError:
            pass  # recorded in the state; health shows the reason

    def ensure_loaded(self, force: bool = False) -> LoadedPipeline:
        """The loaded pipeline, loading it now if needed (blocking; call from a worker thread)."""
        with self._lock:
            if self._loaded is not None:
                return self._loaded
            if self._deps_missing:
                raise BackendNotConfiguredError(
                    "local backends need torch and diffusers: install with `make install` (the 'local' extra)",
                    param="backend",
                )
            if (
                not force
                and self._state is LoadState.FAILED
                and time.monotonic() - self._failed_at < RELOAD_AFTER_FAILURE_SECONDS
            ):
                raise BackendUnavailableError(f"backend '{self.id}' failed to load: {self._failure}")
            self._state = LoadState.LOADING
            started = time.monotonic()
            log.info("loading backend=%s model=%s", self.id, self.model_id)
            manager = self.device_manager
            speed = self._speed_modes()
            try:
                with manager.loading(self) if manager is not None else contextlib.nullcontext():
                    if speed is not None:
                        speed.check(self.settings)  # a refused mode fails the load before a weight is read
                    loaded = self.load_pipeline()
                    # Part of the load, inside the device manager's turn: another backend's load must not
                    # start while this one is loaded but not yet marked so.
                    loaded.previewer = self._calibrate_previews(loaded)
                    if speed is not None:
                        speed.apply(loaded, self.settings.model_dir)
                    # Marked loaded inside the turn too: a backend making room next must count it (else
                    # both stay loaded past SD_MAX_LOADED_PIPELINES).
                    self._load_seconds = time.monotonic() - started
                    metrics.record_model_load(self.id, self._load_seconds, ok=True)  # counted before it shows
                    self._loaded = loaded
                    self._last_used = time.monotonic()
                    self._failure = None
                    # Straight to warming when there are shapes to compile: /health never says ready before.
                    warming = speed is not None and speed.needs_warm_up
                    self._state = LoadState.WARMING if warming else LoadState.READY
            except Exception as error:
                from imagegen.backends.local.support import describe_load_error, release_memory

                self._failure = describe_load_error(error, self.model_id)
                self._failed_at = time.monotonic()
                # Counted before it shows as failed: a device process's counts reach the service first.
                metrics.record_model_load(self.id, None, ok=False)
                self._state = LoadState.FAILED
                self._changed()
                log.error(
                    "backend=%s load failed: %s", self.id, self._failure, exc_info=not isinstance(error, ServiceError)
                )
                release_memory()
                raise BackendUnavailableError(f"backend '{self.id}' failed to load: {self._failure}") from None
            self._changed()
            log.info(
                "loaded backend=%s model=%s device=%s dtype=%s seconds=%.2f",
                self.id,
                self.model_id,
                loaded.device,
                str(loaded.dtype).replace("torch.", ""),
                self._load_seconds,
            )
            if speed is not None and speed.needs_warm_up:
                self._begin_warm_up(loaded, speed)
            return loaded

    def _speed_modes(self) -> SpeedModes | None:
        """The speed modes for the next load (SD_COMPILE, SD_QUANTIZE; backends/local/speed.py), or None."""
        from imagegen.backends.local import speed

        self._speed = speed.SpeedModes.of(self.settings) if speed.requested(self.settings) else None
        return self._speed

    def _begin_warm_up(self, loaded: LoadedPipeline, speed: SpeedModes) -> None:
        """Compile the warm-up shapes on the device thread (now if this is it, else queued to it) while
        /health says warming; jobs queued meanwhile run after it."""
        from imagegen.backends.local.speed import on_device_thread

        if on_device_thread():
            self._warm_up(loaded, speed)
        else:
            device_executor().submit(self._warm_up, loaded, speed)

    def _warm_up(self, loaded: LoadedPipeline, speed: SpeedModes) -> None:
        with self._lock:
            if self._loaded is not loaded:
                return  # unloaded (or reloaded) before its turn came
            try:
                speed.warm_up(self, loaded)
            finally:
                if self._loaded is loaded and self._state is LoadState.WARMING:
                    self._state = LoadState.READY
                self._last_used = time.monotonic()
        self._changed()  # a device process reports ready (or the fallback) to the service

    def _calibrate_previews(self, loaded: LoadedPipeline) -> Any:
        """The live-preview map of a freshly loaded pipeline (previews.calibrate), or None: previews off
        (SD_PREVIEW_INTERVAL=0), a pipeline without a known latent layout, or a calibration that failed."""
        if self.settings.preview_interval <= 0:
            return None
        layout = self.preview_layout(loaded)
        if layout is None:
            return None
        from imagegen.backends.local.previews import calibrate

        return calibrate(loaded.pipe, layout)

    def unload(self, reason: str = "unloaded on request", *, wait_for_call: bool = False) -> bool:
        """Drop the pipeline and return its memory; the next request loads it again.

        With wait_for_call (the DeviceManager making room), wait for a running call to end by
        polling rather than blocking: a backend that holds its own lock while it waits to load is
        not loaded, so the loop ends instead of deadlocking."""
        if not wait_for_call:
            with self._lock:
                return self._unload_locked(reason)
        while self._loaded is not None:
            if self._lock.acquire(timeout=0.1):
                try:
                    return self._unload_locked(reason)
                finally:
                    self._lock.release()
        return False

    def unload_if_idle(self, idle_seconds: float) -> bool:
        """Unload if no call is running and none ran for idle_seconds (the idle-unload task)."""
        if not self._lock.acquire(blocking=False):
            return False  # busy: it is not idle
        try:
            if time.monotonic() - self._last_used < idle_seconds:
                return False
            return self._unload_locked(f"unloaded after {idle_seconds:g} s idle (SD_MODEL_IDLE_UNLOAD_SECONDS)")
        finally:
            self._lock.release()

    def _unload_locked(self, reason: str) -> bool:
        if self._loaded is None:
            return False
        pipe = self._loaded.pipe
        self._loaded = None
        self._state = LoadState.UNLOADED
        # CPU-offload hooks reference the sub-models; remove them so nothing outlives the pipeline.
        with contextlib.suppress(Exception):
            pipe.remove_all_hooks()
        del pipe
        from imagegen.backends.local.support import release_memory

        release_memory()
        metrics.record_model_unload(self.id)
        # Recorded last: once /health shows last_unload, the memory has been handed back.
        self._last_unload = (reason, time.monotonic())
        self._unloads += 1
        self._changed()
        log.info("unloaded backend=%s model=%s: %s", self.id, self.model_id, reason)
        return True

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # reporting must never break a load or an unload
                log.exception("backend=%s: reporting a change failed", self.id)

    def _switch_model_locked(self, model: str) -> None:
        """Make `model` the one to load: a backend serving several models (sd with SD_MODELS) holds one
        pipeline at a time, so another model first unloads the current one (the usual unload path:
        memory handed back, metrics, /health's last_unload).

        The allowlist is checked again here, not only when the request was accepted: a job stored
        before a restart may name a model the configuration no longer allows."""
        if model == self.model_id:
            return
        if model not in self.capabilities().models:
            raise BackendUnavailableError(f"model is no longer available on backend '{self.id}' (not in its settings)")
        self._unload_locked(f"switching to model {model}")
        log.info("backend=%s switching model %s -> %s", self.id, self.model_id, model)
        self.model_id = model
        # A load failure belonged to the previous model; the new one gets its own try.
        self._state = LoadState.UNLOADED
        self._failure = None

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.unload, "the service stopped")

    # -- health ----------------------------------------------------------------------------------
    def uncached_models(self) -> list[str]:
        """The hub repositories a load of the current model needs that are not in the cache (the model,
        its standalone safety checker): a few file lookups, remembered for CACHE_CHECK_SECONDS."""
        from imagegen.backends.local.support import uncached_hub_models

        model = self.model_id
        memo = self._uncached
        if memo is not None and memo[0] == model and time.monotonic() - memo[1] < CACHE_CHECK_SECONDS:
            return memo[2]
        missing = uncached_hub_models(model, self.settings, standalone_checker=self.standalone_checker)
        self._uncached = (model, time.monotonic(), missing)
        return missing

    def refresh(self) -> None:
        """Look at the model cache again at the next health check (after `imagegen models pull`)."""
        self._uncached = None

    def _offline_problem(self) -> str | None:
        """Why the model cannot load now without trying: HF_HUB_OFFLINE and files missing from the cache."""
        from imagegen.backends.local.support import hub_offline, uncached_reason

        if not hub_offline():
            return None
        missing = self.uncached_models()
        return uncached_reason(missing, f"imagegen models pull {self.model_id}") if missing else None

    def availability(self) -> Availability:
        """The state without the report (no memory probe): what admission reads for every job."""
        if self._deps_missing:
            return Availability(BackendState.UNAVAILABLE, DEPS_MISSING)
        state = self._state
        if state is LoadState.LOADING:
            return Availability(BackendState.LOADING, f"loading {self.model_id}")
        if state is LoadState.WARMING:
            return Availability(BackendState.WARMING, f"{self.model_id} loaded; compiling its sizes (SD_COMPILE)")
        if state is LoadState.FAILED:
            return Availability(BackendState.ERROR, self._failure or "load failed")
        if state is LoadState.UNLOADED:
            # Offline and not cached: the first request would only fail; say so before it is sent.
            problem = self._offline_problem()
            if problem is not None:
                return Availability(BackendState.ERROR, problem)
        # Unloaded is ready too: the model loads on the first request.
        return Availability(
            BackendState.READY, f"{self.model_id} {'loaded' if state is LoadState.READY else 'not loaded'}"
        )

    def health(self) -> BackendHealth:
        available = self.availability()
        if available.state is BackendState.UNAVAILABLE:
            return BackendHealth(available.state, available.reason, model=self.model_id)
        loaded = self._loaded
        state = self._state
        device = loaded.device if loaded else None
        dtype = None
        if loaded is not None:
            from imagegen.backends.local.support import dtype_name

            dtype = dtype_name(loaded.dtype)
        from imagegen.backends.local.support import memory_in_use

        # Also when unloaded: the process RSS shows that unloading gave the memory back.
        memory = memory_in_use(device)
        details: dict[str, Any] = {
            "load_seconds": round(self._load_seconds, 3) if self._load_seconds else None,
            "safety_checker_enabled": self.settings.safety_checker,
        }
        if loaded is not None:
            # Everything the load decided, but the scheduler's config (internal, large).
            details.update((key, value) for key, value in loaded.details.items() if key != "scheduler_config")
            if loaded.adapters is not None:
                details["loras"] = loaded.adapters.describe()
        if self._speed is not None:
            details["speed_modes"] = dict(self._speed.status)
        if self.device_manager is not None:
            details["residency"] = self.device_manager.describe()
        if self._last_unload is not None:
            reason, when = self._last_unload
            details["last_unload"] = {
                "reason": reason,
                "seconds_ago": round(time.monotonic() - when, 1),
                "count": self._unloads,
            }
        if state is LoadState.READY:
            return BackendHealth(
                BackendState.READY,
                f"{self.model_id} loaded on {device} ({dtype})",
                model=self.model_id,
                device=device,
                dtype=dtype,
                loaded=True,
                memory=memory,
                details=details,
            )
        if available.state is not BackendState.READY:  # loading, or the load failed: the reason says which
            return BackendHealth(available.state, available.reason, model=self.model_id, details=details)
        reason = "not loaded; loads on the first request"
        if self._last_unload is not None:
            reason = f"{self._last_unload[0]}; loads again on the next request"
        return BackendHealth(
            BackendState.READY,
            reason,
            model=self.model_id,
            loaded=False,
            memory=memory,
            details=details,
        )

    # -- generation ------------------------------------------------------------------------------
    async def generate(self, batch: Sequence[GenerationRequest], ctx: RunContext) -> list[list[GeneratedImage]]:
        # The input images are read and fitted in a worker thread first: the device never waits for
        # the CPU to decode them.
        inputs = await asyncio.to_thread(conditioning.load, self.inputs, batch[0])
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(device_executor(), self._generate_blocking, list(batch), ctx, inputs)
        try:
            host, info = await asyncio.shield(call)
        except asyncio.CancelledError:
            # A pipeline call cannot be abandoned: the device stays busy until it returns. Ask it to
            # stop between steps and return only once the device is free, so that the engine never
            # starts another batch behind a call it gave up on (a cancel arriving again ends the wait).
            ctx.cancel_all()
            call.add_done_callback(lambda done: done.cancelled() or done.exception())
            await asyncio.wait({call})
            raise
        # The device is free (ctx.release_device): the rest runs on the finisher thread, and its time
        # still counts to the jobs (their deadline holds until this returns).
        return await loop.run_in_executor(finisher_executor(), self._finish, list(batch), host, info)

    def _generate_blocking(
        self, batch: list[GenerationRequest], ctx: RunContext, inputs: Conditioning
    ) -> tuple[HostImages, dict[str, Any]]:
        """The device thread's part of a batch: the pipeline call, the checks on the device and the copy of
        the pixels to the host (finisher.py). The device is released (ctx.release_device) on return."""
        from imagegen.backends.local import support
        from imagegen.backends.local.finisher import to_host

        with self._lock:
            ctx.mark_started()  # the device is this batch's now (a load or another call may have held it)
            self._switch_model_locked(batch[0].model)  # a batch never mixes models (the batch key has it)
            loaded = self.ensure_loaded()
            ctx.check()
            try:
                # A batch shares one set of LoRAs (the batch key has it): every image gets them.
                applied = self._activate_loras(loaded, batch[0].loras)
                images = self.run_pipeline(loaded, batch, ctx, inputs)
                host = to_host(images, loaded.safety)
                del images  # the device's copy goes before the next batch allocates its own
            except ServiceError:
                raise  # cancelled, deadline, and the backend's own typed errors pass through
            except Exception as error:
                if support.is_out_of_memory(error):
                    del error
                    support.release_memory()
                    pixels = batch[0].width * batch[0].height
                    count = sum(r.num_images for r in batch)
                    raise OutOfMemoryError(
                        f"out of memory generating {count} image(s) of {pixels} pixels on {loaded.device}: "
                        "reduce the size or the number of images, or use the flux-api backend"
                    ) from None
                if support.is_fatal_device_error(error):
                    self._failure = f"device error: {type(error).__name__}; the backend will reload"
                    log.exception("backend=%s fatal device error", self.id)
                    self._loaded = None
                    self._state = LoadState.FAILED
                    self._failed_at = time.monotonic()
                    support.release_memory()
                    self._changed()
                    raise BackendUnavailableError(f"backend '{self.id}' hit a device error and is reloading") from None
                log.exception("backend=%s generation failed", self.id)
                raise GenerationFailedError("the pipeline failed to generate an image") from None
            finally:
                self._last_used = time.monotonic()  # idle time counts from the end of the last call
        ctx.release_device()
        return host, {"loras": applied} if applied else {}

    def _finish(
        self, batch: list[GenerationRequest], host: HostImages, info: dict[str, Any]
    ) -> list[list[GeneratedImage]]:
        """The finisher thread's part: the pixels once on the host, as one GeneratedImage per seed."""
        from PIL import Image

        pixels = host.wait()
        results: list[list[GeneratedImage]] = []
        index = 0
        for request in batch:
            items = []
            for seed in request.seeds:
                nsfw = host.nsfw[index]
                image = None if nsfw else Image.fromarray(pixels[index])
                items.append(GeneratedImage(seed=seed, image=image, nsfw=nsfw, info=dict(info)))
                index += 1
            results.append(items)
        return results

    def _activate_loras(self, loaded: LoadedPipeline, loras: Sequence[LoraWeight]) -> list[dict[str, Any]]:
        """Put exactly these LoRAs on the pipeline (none: the base model); what was applied."""
        if loaded.adapters is None:
            if not loras:
                return []  # never had an adapter: nothing to switch off
            from imagegen.backends.local.loras import AdapterSet

            loaded.adapters = AdapterSet(
                loaded.pipe,
                self.lora_catalog or LoraCatalog(self.settings.lora_folder),
                self.settings.max_loaded_loras,
                f"model '{self.model_id}' on backend '{self.id}'",
            )
        return loaded.adapters.activate(loras)

    @staticmethod
    def batch_preview(loaded: LoadedPipeline, batch: Sequence[GenerationRequest]) -> Any:
        """What the step callback needs to preview this batch (previews.BatchPreview), or None."""
        if loaded.previewer is None:
            return None
        from imagegen.backends.local.previews import BatchPreview

        first = batch[0]
        return BatchPreview.of(loaded.previewer, [request.num_images for request in batch], first.width, first.height)

    @staticmethod
    def step_callback(ctx: RunContext, total_steps: int, preview: Any = None) -> StepCallback:
        """diffusers' callback_on_step_end: report progress, a live preview when one is due (`preview`:
        a previews.BatchPreview), stop between steps when asked.

        Raising stops the pipeline at once and leaves it usable (setting `_interrupt` would still
        decode and return an image, which a cancelled job must not get)."""
        state = {"preview": preview}

        def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            total = getattr(pipe, "_num_timesteps", None) or total_steps
            ctx.report_step(step + 1, total)
            previewer = state["preview"]
            if previewer is not None and ctx.preview_due(step + 1, total) and kwargs.get("latents") is not None:
                try:
                    images = previewer.render(kwargs["latents"])
                except Exception:  # a preview must never fail a generation (logged with its traceback)
                    log.warning("live preview failed (%s); none more in this call", type(pipe).__name__, exc_info=True)
                    state["preview"] = None
                else:
                    ctx.report_preview(step + 1, total, images)
            ctx.check()
            return kwargs

        return callback
