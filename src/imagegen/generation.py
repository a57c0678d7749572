"""The values a generation is made of, shared by every layer: the loose parameters a dialect
produces (`GenerationParams`), the validated request a backend runs and a job stores
(`GenerationRequest`), and one generated image (`GeneratedImage`). Plain values: no I/O, no torch.

Image-conditioned requests (img2img, inpainting, reference editing) carry their input images as
`InputImage` references: the content hash of a file in the input store (storage/inputs.py) and its
size, never pixels, so that a request stays small in the job store and across process boundaries."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from imagegen.config import OutputFormat

if TYPE_CHECKING:
    from PIL.Image import Image

SEED_MAX = 2**32 - 1

#: What a request does with its images: none (txt2img); repaint the one init image (img2img); repaint
#: the masked part of it (inpaint); generate guided by reference images (edit: FLUX.2 multi-reference).
Mode = Literal["txt2img", "img2img", "inpaint", "edit"]
MODES: tuple[Mode, ...] = ("txt2img", "img2img", "inpaint", "edit")
#: How an init image (and its mask) is fitted to the output size: stretch to it (A1111's "just
#: resize"), scale and crop the overflow ("crop and resize"), or scale inside and pad ("resize and fill").
ResizeMode = Literal["resize", "crop", "fill"]


class InputImage(BaseModel):
    """An uploaded image in the input store: its content hash and size (the pixels stay on disk)."""

    model_config = ConfigDict(frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    width: int = Field(ge=1)
    height: int = Field(ge=1)


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
    #: The init image (img2img, inpaint) or the reference images (edit), stored; empty: txt2img.
    images: tuple[InputImage, ...] = ()
    #: White = repaint; the same size as images[0].
    mask: InputImage | None = None
    #: How much of the init image is repainted, 0 < strength <= 1 (None: the mode's default).
    strength: float | None = None
    resize_mode: ResizeMode = "resize"


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
    mode: Mode = "txt2img"
    images: tuple[InputImage, ...] = ()
    mask: InputImage | None = None
    #: img2img and inpaint only; None in the other modes.
    strength: float | None = None
    resize_mode: ResizeMode = "resize"

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def denoising_steps(self) -> int | None:
        """The steps the pipeline actually runs: img2img and inpaint start part-way, at
        int(steps x strength) (diffusers' rule); None where the model takes no steps."""
        if self.steps is None:
            return None
        if self.strength is None:
            return self.steps
        return int(self.steps * self.strength)

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
            # Edits batch only with identical conditioning: same mode, strength and input images.
            self.mode,
            self.strength,
            self.resize_mode,
            tuple(image.sha256 for image in self.images),
            self.mask.sha256 if self.mask is not None else None,
        )


@dataclass
class GeneratedImage:
    """One output image. A flagged image carries no pixels: it is never returned as content."""

    seed: int
    image: Image | None
    nsfw: bool = False
    info: dict[str, Any] = field(default_factory=dict)
