"""A known backend id whose implementation has not landed yet: visible, never selectable."""

from __future__ import annotations

from collections.abc import Sequence

from imagegen.backends.base import (
    BackendHealth,
    BackendState,
    Capabilities,
    GeneratedImage,
    GenerationRequest,
    ImageBackend,
    RunContext,
)
from imagegen.errors import BackendUnavailableError


class NotImplementedBackend(ImageBackend):
    def __init__(self, settings, backend_id: str) -> None:  # type: ignore[no-untyped-def]
        super().__init__(settings)
        self.id = backend_id
        self.lane = backend_id

    def capabilities(self) -> Capabilities:
        return Capabilities(
            models=("none",),
            default_width=1024,
            default_height=1024,
            size_multiple=16,
            min_size=64,
            max_width=self.settings.max_width,
            max_height=self.settings.max_height,
            max_pixels=self.settings.max_pixels,
            default_steps=None,
            max_steps=self.settings.max_steps,
            max_batch=1,
        )

    def health(self) -> BackendHealth:
        return BackendHealth(BackendState.NOT_CONFIGURED, f"backend '{self.id}' is not implemented in this version")

    async def generate(self, batch: Sequence[GenerationRequest], ctx: RunContext) -> list[list[GeneratedImage]]:
        raise BackendUnavailableError(f"backend '{self.id}' is not implemented in this version")
