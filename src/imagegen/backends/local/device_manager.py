"""Which local pipelines stay in memory: the local backends (`sd`, `flux-local`) share one device.

A GPU that holds an SDXL or FLUX.2 [klein] pipeline rarely has room for a second one. Every local
backend registers with the one DeviceManager of its app (the backend registry owns it and the app
starts and stops it, once); before a backend loads, the manager unloads
the least recently used other pipelines until the new one fits under SD_MAX_LOADED_PIPELINES, and a
background task unloads pipelines idle for SD_MODEL_IDLE_UNLOAD_SECONDS. The next request for an
unloaded backend loads it again.

Unloading another backend's pipeline is safe between its calls: each backend holds its own lock for
every pipeline call and for unloading, and the engine runs one batch at a time on the "local" lane.
Nothing here imports torch, nor the backends: the manager knows them only as `ResidentPipeline`s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

from imagegen.config import Settings

log = logging.getLogger("imagegen.backends")

#: Pipelines held at once when SD_MAX_LOADED_PIPELINES is 0 (auto).
AUTO_LIMIT_ACCELERATOR = 1
AUTO_LIMIT_CPU = 2


@runtime_checkable
class ResidentPipeline(Protocol):
    """What the manager needs of a backend whose pipeline occupies the device (LocalPipelineBackend)."""

    @property
    def id(self) -> str: ...

    @property
    def is_loaded(self) -> bool: ...

    @property
    def last_used(self) -> float:
        """time.monotonic() of the last load or pipeline call."""
        ...

    def attach_device_manager(self, manager: DeviceManager) -> None: ...

    def unload(self, reason: str = ..., *, wait_for_call: bool = False) -> bool: ...

    def unload_if_idle(self, idle_seconds: float) -> bool: ...


class DeviceManager:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._backends: list[ResidentPipeline] = []
        # One load at a time (with the evictions it needs), so two backends loading together cannot
        # both decide there is room.
        self._load_lock = threading.Lock()
        self._idle_task: asyncio.Task[None] | None = None
        self._device: str | None = None

    # -- registration --------------------------------------------------------------------------
    @classmethod
    def share(cls, settings: Settings, backends: Iterable[object]) -> DeviceManager:
        """One manager for every local backend among `backends` (others are left alone)."""
        manager = cls(settings)
        for backend in backends:
            if isinstance(backend, ResidentPipeline):
                backend.attach_device_manager(manager)
                manager._backends.append(backend)
        return manager

    # -- policy --------------------------------------------------------------------------------
    def limit(self) -> int:
        """The most pipelines held at once. Auto resolves the device on a loading path only (torch)."""
        if self.settings.max_loaded_pipelines:
            return self.settings.max_loaded_pipelines
        if self._device is None:
            from imagegen.backends.local.support import pick_device
            from imagegen.errors import BackendUnavailableError

            try:
                self._device = pick_device(self.settings.device)
            except BackendUnavailableError:
                self._device = "cpu"  # the load itself reports the device problem
        return AUTO_LIMIT_CPU if self._device == "cpu" else AUTO_LIMIT_ACCELERATOR

    def describe(self) -> dict[str, Any]:
        """For /health: the policy and what is loaded now (no torch import)."""
        configured = self.settings.max_loaded_pipelines
        return {
            "max_loaded_pipelines": configured or (self.limit() if self._device else "auto"),
            "idle_unload_seconds": self.settings.model_idle_unload_seconds or None,
            "loaded_pipelines": [backend.id for backend in self._backends if backend.is_loaded],
        }

    @contextlib.contextmanager
    def loading(self, backend: ResidentPipeline) -> Iterator[None]:
        """Held by a backend while it loads: first make room for it, then let it load alone."""
        with self._load_lock:
            self._make_room(backend)
            yield

    def _make_room(self, loading: ResidentPipeline) -> None:
        limit = self.limit()
        others = sorted(
            (backend for backend in self._backends if backend is not loading and backend.is_loaded),
            key=lambda backend: backend.last_used,
        )
        while others and len(others) + 1 > limit:
            victim = others.pop(0)  # least recently used first
            victim.unload(
                reason=f"unloaded to make room for {loading.id} (SD_MAX_LOADED_PIPELINES={limit})",
                wait_for_call=True,
            )

    # -- idle unloading ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the idle-unload task on the running loop (once; only when the setting asks). The
        registry calls it when the app (or the in-process CLI) starts, and `stop` when it stops."""
        if self.settings.model_idle_unload_seconds <= 0 or self._idle_task is not None:
            return
        self._idle_task = asyncio.get_running_loop().create_task(self._unload_idle_forever(), name="idle-unload")

    async def stop(self) -> None:
        task, self._idle_task = self._idle_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _unload_idle_forever(self) -> None:
        idle = self.settings.model_idle_unload_seconds
        # Check often enough that a pipeline goes within ~25% of the setting after its last use.
        interval = min(max(idle / 4, 0.05), 30.0)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for backend in self._backends:
                if backend.is_loaded and now - backend.last_used >= idle:
                    try:
                        await loop.run_in_executor(None, backend.unload_if_idle, idle)
                    except Exception:
                        log.exception("idle unload of backend=%s failed", backend.id)
