"""The local backends as the service sees them when they run in the device process
(SD_DEVICE_ISOLATION=process, the default): one `IsolatedBackend` per local backend id.

What a request is checked against (capabilities, `resolve`) comes from a service-side instance of the
real backend class that never loads a pipeline; it learns what loads decided (native size, pipeline
class, FLUX profile) from the device process's reports. `health()` is the device process's last
report merged with the supervisor's view (restarting, the batch on the device, the last exit), and
`generate()` sends the batch to the device process (supervisor.py). Nothing here imports torch.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

from imagegen.backends.base import BackendHealth, BackendState, Capabilities, ImageBackend, RunContext
from imagegen.backends.local.base import LocalPipelineBackend
from imagegen.backends.local.supervisor import DeviceSupervisor
from imagegen.config import Settings
from imagegen.errors import BackendUnavailableError
from imagegen.generation import GeneratedImage, GenerationParams, GenerationRequest, LoraWeight
from imagegen.storage.lora_format import LoraFamily
from imagegen.storage.loras import LoraCatalog


class IsolatedBackend(ImageBackend):
    """A local backend whose pipeline runs in the device process."""

    reports_start = True
    runs_on_device = True

    def __init__(self, inner: LocalPipelineBackend, supervisor: DeviceSupervisor) -> None:
        super().__init__(inner.settings)
        self.inner = inner
        self.supervisor = supervisor
        self.id = inner.id
        self.lane = inner.lane
        self.concurrency = inner.concurrency

    # The model a request naming none gets lives on the service-side instance, whose `resolve` and
    # capabilities use it.
    @property
    def default_model(self) -> str | None:
        return self.inner.default_model

    @default_model.setter
    def default_model(self, model: str | None) -> None:
        self.inner.default_model = model

    # The LoRA folder the registry shares: the service-side instance checks requests against it
    # (resolve_loras); the device process reads the same folder (host.py).
    @property
    def lora_catalog(self) -> LoraCatalog | None:
        return self.inner.lora_catalog

    @lora_catalog.setter
    def lora_catalog(self, catalog: LoraCatalog | None) -> None:
        self.inner.lora_catalog = catalog

    def capabilities(self) -> Capabilities:
        return self.inner.capabilities()

    def default_model_id(self) -> str:
        return self.inner.default_model_id()

    def resolve(self, params: GenerationParams) -> GenerationRequest:
        """Checked on this side, by the backend's own rules (sizes, modes, LoRA families): nothing is
        sent to the device process for a request that is refused."""
        return self.inner.resolve(params)

    def lora_family(self, model: str) -> LoraFamily:
        return self.inner.lora_family(model)

    def resolve_loras(self, loras: Sequence[LoraWeight], model: str) -> tuple[LoraWeight, ...]:
        return self.inner.resolve_loras(loras, model)

    def refresh(self) -> None:
        """Both sides look at the disk again: this one (configs for requests' checks) and the device
        process (cache state in its health reports), whose fresh report is here when this returns."""
        self.inner.refresh()
        if not self.inner.dependencies_missing:
            self.supervisor.refresh_blocking(self.id)

    def capabilities_for(self, model: str) -> Capabilities:
        return self.inner.capabilities_for(model)

    def info(self) -> dict[str, Any]:
        return self.inner.info()

    def health(self) -> BackendHealth:
        inner = self.inner
        device = self.supervisor.describe()
        if inner.dependencies_missing:
            health = inner.health()  # says what to install; no device process is started
        else:
            health = self._reported_health(device)
        health.details["device_process"] = device
        return health

    def _reported_health(self, device: dict[str, Any]) -> BackendHealth:
        found = self.supervisor.report(self.id)
        state = device["state"]
        model = self.inner.model_id
        if found is None:
            last_exit = (device.get("last_exit") or {}).get("reason")
            after = f" after: {last_exit}" if last_exit else ""
            if state in ("starting", "restarting"):
                return BackendHealth(
                    BackendState.LOADING, f"the device process is {state}{after}", model=model, details={}
                )
            if state == "failed":
                return BackendHealth(BackendState.ERROR, self.supervisor.unavailable_reason(), model=model, details={})
            return self.inner.health()  # not started yet: "not loaded; loads on the first request"
        report, received = found
        health = copy.copy(report.health)
        health.details = copy.deepcopy(report.health.details)
        unload = health.details.get("last_unload")
        if isinstance(unload, dict) and isinstance(unload.get("seconds_ago"), int | float):
            unload["seconds_ago"] = round(unload["seconds_ago"] + time.monotonic() - received, 1)
        return health

    async def start(self) -> None:
        if self.preload and not self.inner.dependencies_missing:
            await self.supervisor.start(preload=self.id)

    async def until_available(self) -> None:
        if not self.inner.dependencies_missing:
            await self.supervisor.until_available()

    async def generate(self, batch: Sequence[GenerationRequest], ctx: RunContext) -> list[list[GeneratedImage]]:
        if self.inner.dependencies_missing:
            raise BackendUnavailableError(
                "local backends need torch and diffusers: install with `make install` (the 'local' extra)"
            )
        return await self.supervisor.run(self.id, list(batch), ctx)

    def unload(self, reason: str = "unloaded on request") -> bool:
        """Unload the pipeline in the device process (from a thread other than the service's loop)."""
        return self.supervisor.unload_blocking(self.id, reason)


def isolate(
    settings: Settings, backends: dict[str, ImageBackend]
) -> tuple[dict[str, ImageBackend], DeviceSupervisor | None]:
    """The backends with every local one replaced by an IsolatedBackend, and the one supervisor of
    their device process (None when there is no local backend)."""
    local = {
        backend_id: backend for backend_id, backend in backends.items() if isinstance(backend, LocalPipelineBackend)
    }
    if not local:
        return backends, None
    supervisor = DeviceSupervisor(settings, local)
    isolated: dict[str, ImageBackend] = {
        backend_id: IsolatedBackend(local[backend_id], supervisor) if backend_id in local else backend
        for backend_id, backend in backends.items()
    }
    return isolated, supervisor
