"""One way to turn a dialect's request into `GenerationParams`, shared by the native, A1111 and OpenAI
routes (the shape of vLLM's `Request.to_sampling_params(defaults)`):

    defaults = defaults_for(body, registry, settings)   # body.target(): which backend and model
    params = body.to_params(defaults)                   # the dialect's own rules, server defaults given

Each request model has `target(registry)` (the backend and model it names, errors in its own words)
and `to_params(defaults)`. `RequestDefaults` carries what a dialect needs from the server to translate:
the chosen model's capabilities (default steps, schedulers offered) and the limits. The backend's
`resolve` then validates the parameters and fills the remaining defaults, as for every job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from imagegen.backends.base import Capabilities, ImageBackend
from imagegen.backends.registry import BackendRegistry
from imagegen.config import Settings
from imagegen.generation import GenerationParams


@dataclass(frozen=True)
class Target:
    """The backend a request goes to and the model it names (None: the backend's default)."""

    backend: ImageBackend
    model: str | None = None


@dataclass(frozen=True)
class RequestDefaults:
    """What the server decides for a request before its dialect's parameters are read."""

    backend: str
    #: The model the request gets (the one it names, or the backend's default).
    model: str
    #: That model's capabilities on that backend.
    capabilities: Capabilities
    #: The most steps a request may ask for (the backend's and SD_MAX_STEPS, the lower).
    max_steps: int
    #: The most images one request may ask for (SD_MAX_IMAGES).
    max_images: int

    @property
    def default_steps(self) -> int | None:
        return self.capabilities.default_steps

    @property
    def schedulers(self) -> tuple[str, ...]:
        """The scheduler names the model offers; empty when it takes none."""
        return self.capabilities.schedulers


class DialectRequest(Protocol):
    def target(self, registry: BackendRegistry) -> Target: ...

    def to_params(self, defaults: RequestDefaults) -> GenerationParams: ...


def request_defaults(backend: ImageBackend, model: str | None, settings: Settings) -> RequestDefaults:
    """The defaults for `model` (None: the backend's default) on `backend`; a model the backend does
    not offer is a 422 naming `model`, as `resolve` answers it."""
    chosen = backend.model_for(model)
    capabilities = backend.capabilities_for(chosen)
    return RequestDefaults(
        backend=backend.id,
        model=chosen,
        capabilities=capabilities,
        max_steps=min(capabilities.max_steps, settings.max_steps),
        max_images=settings.max_images,
    )


def defaults_for(body: DialectRequest, registry: BackendRegistry, settings: Settings) -> RequestDefaults:
    """The server defaults for what `body` targets."""
    target = body.target(registry)
    return request_defaults(target.backend, target.model, settings)
