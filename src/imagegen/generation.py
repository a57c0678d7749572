"""The values a generation is made of, shared by every layer: the loose parameters a dialect
produces (`GenerationParams`), the validated request a backend runs and a job stores
(`GenerationRequest`), and one generated image (`GeneratedImage`). Plain values: no I/O, no torch."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from imagegen.config import OutputFormat

if TYPE_CHECKING:
    from PIL.Image import Image

SEED_MAX = 2**32 - 1


class LoraWeight(BaseModel):
    """One LoRA adapter asked for: the file's name in SD_LORA_DIR (its stem) and its weight.
    Names and weights travel, never paths or tensors: whoever runs the pipeline loads the file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    weight: float = 1.0


class GenerationParams(BaseModel):
    """Loose parameters as the API received them; any may be absent (backend defaults apply)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    num_images: int = 1
    scheduler: str | None = None
    output_format: OutputFormat = "png"
    model: str | None = None
    loras: tuple[LoraWeight, ...] = ()
    backend_options: dict[str, Any] = {}


class GenerationRequest(BaseModel):
    """A validated request with every default resolved and one seed per image. Stored with its job
    so that a retried job generates exactly what was asked."""

    model_config = ConfigDict(frozen=True)

    backend: str
    model: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int | None
    guidance_scale: float | None
    scheduler: str | None
    seeds: tuple[int, ...]
    output_format: OutputFormat
    ignored: tuple[str, ...] = ()
    #: The LoRA adapters to apply, in the order asked (empty: the base model alone).
    loras: tuple[LoraWeight, ...] = ()
    backend_options: dict[str, Any] = {}

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    def batch_key(self) -> Hashable:
        """Requests with equal keys can share one pipeline call."""
        return (
            self.backend,
            self.model,
            self.width,
            self.height,
            self.steps,
            self.scheduler,
            self.guidance_scale,
            self.negative_prompt is not None,
            tuple(sorted(self.backend_options.items())),
            # One pipeline call runs with one set of adapters: only requests asking for the same
            # LoRAs with the same weights share it (order does not change the sum).
            tuple(sorted((lora.name, lora.weight) for lora in self.loras)),
        )


@dataclass
class GeneratedImage:
    """One output image. A flagged image carries no pixels: it is never returned as content."""

    seed: int
    image: Image | None
    nsfw: bool = False
    info: dict[str, Any] = field(default_factory=dict)
