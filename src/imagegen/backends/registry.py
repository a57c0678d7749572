"""Maps backend ids to factories and holds the backends of one app instance; `start()` and `close()`
bring them all up and down.

The local backends share one device. With SD_DEVICE_ISOLATION=process (the default) they run in a
device process (backends/local/isolated.py, supervisor.py) that the registry owns and stops last;
with SD_DEVICE_ISOLATION=thread they run here, and the registry owns the DeviceManager that decides
which of their pipelines stay loaded (in the device process, the process's own manager does)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import TYPE_CHECKING, Any

from imagegen.backends.base import ImageBackend
from imagegen.backends.local.device_manager import DeviceManager
from imagegen.config import Backend, Settings
from imagegen.errors import InvalidParameterError
from imagegen.storage.loras import LoraCatalog

if TYPE_CHECKING:
    from imagegen.backends.local.supervisor import DeviceSupervisor

BackendFactory = Callable[[Settings], ImageBackend]


def _sd(settings: Settings) -> ImageBackend:
    from imagegen.backends.local.sd import StableDiffusionBackend

    return StableDiffusionBackend(settings)


def _flux_local(settings: Settings) -> ImageBackend:
    from imagegen.backends.local.flux_local import FluxLocalBackend

    return FluxLocalBackend(settings)


def _flux_api(settings: Settings) -> ImageBackend:
    from imagegen.backends.bfl.backend import FluxApiBackend

    return FluxApiBackend(settings)


DEFAULT_FACTORIES: dict[str, BackendFactory] = {
    Backend.SD.value: _sd,
    Backend.FLUX_LOCAL.value: _flux_local,
    Backend.FLUX_API.value: _flux_api,
}


class BackendRegistry:
    """The backends of one service instance, by id, with the default one."""

    def __init__(
        self,
        backends: dict[str, ImageBackend],
        default_id: str,
        device_manager: DeviceManager | None = None,
        loras: LoraCatalog | None = None,
        device_process: DeviceSupervisor | None = None,
    ) -> None:
        if default_id not in backends:
            raise ValueError(f"default backend '{default_id}' is not registered")
        self._backends = backends
        self.default_id = default_id
        #: decides which local pipelines stay loaded on the device they share, when they run in this
        #: process (None: no local backends here)
        self.device_manager = device_manager
        #: the LoRA folder (SD_LORA_DIR) the backends read, one cache of headers and hashes for all
        self.loras = loras
        #: the supervisor of the device process the local backends run in (None: they run here)
        self.device_process = device_process
        for backend_id, backend in backends.items():
            backend.preload = backend_id == default_id
            if loras is not None:
                backend.lora_catalog = loras

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        factories: dict[str, BackendFactory] | None = None,
        default_id: str | None = None,
        only: Collection[str] | None = None,
    ) -> BackendRegistry:
        """The standard backends (plus extra factories, e.g. a test's fake backend); `only` keeps
        those ids (a worker of a cluster builds just the backends it serves)."""
        factories = {**DEFAULT_FACTORIES, **(factories or {})}
        if only is not None:
            factories = {backend_id: factory for backend_id, factory in factories.items() if backend_id in only}
        backends = {backend_id: factory(settings) for backend_id, factory in factories.items()}
        default = default_id or settings.default_backend.value
        if settings.device_isolation == "process":
            from imagegen.backends.local.isolated import isolate

            isolated, supervisor = isolate(settings, backends)
            return cls(isolated, default, loras=LoraCatalog(settings.lora_folder), device_process=supervisor)
        # The local backends share one device: one manager decides which of them stay loaded.
        manager = DeviceManager.share(settings, backends.values())
        return cls(backends, default, manager, LoraCatalog(settings.lora_folder))

    async def start(self) -> None:
        """Start every backend (the default one may begin loading), then the device manager's
        idle-unload task: once per app, whatever the number of local backends."""
        for backend in self:
            await backend.start()
        if self.device_manager is not None:
            self.device_manager.start()

    async def close(self) -> None:
        """Stop the idle unloading first (nothing unloads behind the backends' backs), then close
        every backend (local ones hand their memory back)."""
        if self.device_manager is not None:
            await self.device_manager.stop()
        for backend in self:
            await backend.close()
        if self.device_process is not None:
            await self.device_process.close()

    def devices_seen(self) -> dict[str, Any]:
        """The devices torch sees where the local backends run (support.devices_seen); never imports torch."""
        from imagegen.backends.local.support import devices_seen

        if self.device_process is not None and self.device_process.devices:
            return dict(self.device_process.devices)
        return devices_seen()

    def accelerator_memory(self) -> list[tuple[str, str, int]]:
        """(device, kind, bytes) of the accelerators the local backends use, wherever they run."""
        if self.device_process is not None:
            return list(self.device_process.memory()[1])
        from imagegen.backends.local.support import accelerator_memory

        return accelerator_memory()

    def refresh(self) -> None:
        """Every backend looks at its models on disk again (A1111's refresh-checkpoints)."""
        for backend in self:
            backend.refresh()

    def get(self, backend_id: str | None) -> ImageBackend:
        """The named backend, or the default one; an unknown id is a 422 listing the known ids."""
        key = backend_id or self.default_id
        try:
            return self._backends[key]
        except KeyError:
            raise InvalidParameterError(
                f"unknown backend; known backends: {', '.join(self._backends)}", param="backend"
            ) from None

    def set_default(self, backend_id: str, model: str | None = None) -> None:
        """Change, at runtime and in memory only, which backend (and model of it) a request naming
        none gets: what an A1111 client's "checkpoint" choice means. The model must be one the
        backend offers; the new default loads on first use (a restart returns to the settings)."""
        backend = self.get(backend_id)
        if model is not None and model not in backend.capabilities().models:
            raise InvalidParameterError(f"model is not available on backend '{backend.id}'", param="model")
        self.default_id = backend.id
        backend.default_model = model

    @property
    def default(self) -> ImageBackend:
        return self._backends[self.default_id]

    def ids(self) -> list[str]:
        return list(self._backends)

    def __iter__(self) -> Iterator[ImageBackend]:
        return iter(self._backends.values())
