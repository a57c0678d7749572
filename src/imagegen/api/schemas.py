"""Request and response models of the native API (`/api/*`, `/health`, `/info`).

Request models are strict (no silent type coercion; unknown keys are errors) and carry static
sanity bounds; the service limits (SD_MAX_*) and each backend's own rules are checked afterwards by
the backend's `resolve`, with messages that name the parameter.
"""

from __future__ import annotations

import itertools
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from imagegen.api.dialects import Dialect, documented_errors
from imagegen.api.translation import RequestDefaults, Target
from imagegen.api.uploads import StoredInputs
from imagegen.config import OutputFormat
from imagegen.generation import SEED_MAX, GenerationParams, LoraWeight, ResizeMode

if TYPE_CHECKING:
    from imagegen.backends.registry import BackendRegistry

_HARD_MAX_SIDE = 16384
_HARD_MAX_TEXT = 100_000
#: Unknown keys validated (and reported) at most: a body of 80,000 unknown keys would otherwise cost
#: about a second of event loop building 80,000 errors that nobody reads (the answer names the first).
MAX_UNKNOWN_KEYS = 4


class LoraIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200, description="A LoRA's name: its file in SD_LORA_DIR, no suffix.")
    weight: float = Field(1.0, ge=-10, le=10, allow_inf_nan=False, description="0: no effect; 1: as trained.")


_INTEGER_TEXT = re.compile(r"-?[0-9]{1,20}")
_DECIMAL_TEXT = re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,20})?")


def _integer_text(value: Any) -> Any:
    """ "2" -> 2: n8n's HTTP Request node sends numbers as strings when the body's fields are filled one
    by one. Only plain decimal digits; everything else (and every other type) meets the strict check."""
    if isinstance(value, str) and _INTEGER_TEXT.fullmatch(value.strip()):
        return int(value.strip())
    return value


def _decimal_text(value: Any) -> Any:
    """ "7.5" -> 7.5 (see _integer_text); no exponents, inf or nan."""
    if isinstance(value, str) and _DECIMAL_TEXT.fullmatch(value.strip()):
        return float(value.strip())
    return value


#: Numbers that may arrive as numeric strings (the native routes' only coercion; booleans, lists and
#: the rest stay strict).
IntegerField = Annotated[int, BeforeValidator(_integer_text)]
DecimalField = Annotated[float, BeforeValidator(_decimal_text)]


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [{"prompt": "a lighthouse at dawn, oil painting", "width": 512, "height": 512, "seed": 42}]
        },
    )

    prompt: str = Field(min_length=1, max_length=_HARD_MAX_TEXT, description="What to draw.")
    negative_prompt: str | None = Field(None, max_length=_HARD_MAX_TEXT, description="What to avoid.")
    backend: str | None = Field(
        None, max_length=64, description="sd | flux-local | flux-api; absent: SD_DEFAULT_BACKEND."
    )
    model: str | None = Field(None, max_length=256, description="A model the backend offers; absent: its default.")
    width: IntegerField | None = Field(None, ge=1, le=_HARD_MAX_SIDE, description="Absent: the model's native size.")
    height: IntegerField | None = Field(None, ge=1, le=_HARD_MAX_SIDE)
    steps: IntegerField | None = Field(None, ge=1, le=1000, description="Denoising steps; absent: the model's default.")
    guidance_scale: DecimalField | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    seed: IntegerField | None = Field(
        None, ge=-1, le=SEED_MAX, description="Absent or -1: random. The seed used is returned."
    )
    num_images: IntegerField = Field(1, ge=1, le=64)
    scheduler: str | None = Field(None, max_length=64, description="One of GET /api/backends' schedulers.")
    output_format: Literal["png", "jpeg", "webp"] = "png"
    safety_tolerance: IntegerField | None = Field(
        None, ge=0, le=6, description="flux-api only: BFL moderation tolerance, 0 strictest."
    )
    loras: list[LoraIn] | None = Field(
        None,
        max_length=64,
        description="sd and flux-local: LoRA adapters from SD_LORA_DIR (GET /api/loras), at most SD_MAX_LORAS.",
    )

    @model_validator(mode="before")
    @classmethod
    def _bound_unknown_keys(cls, data: Any) -> Any:
        """Keep the known keys and the first MAX_UNKNOWN_KEYS unknown ones (which are still refused):
        the work done on a body is bounded by the fields, not by what a caller can pack into it."""
        fields = cls.model_fields
        if not isinstance(data, dict) or len(data) <= len(fields) + MAX_UNKNOWN_KEYS:
            return data
        unknown = itertools.islice((key for key in data if key not in fields), MAX_UNKNOWN_KEYS)
        return {key: data[key] for key in (*(name for name in fields if name in data), *unknown)}

    def target(self, registry: BackendRegistry) -> Target:
        return Target(registry.get(self.backend), self.model)

    def image_params(self, inputs: StoredInputs | None) -> dict[str, Any]:
        """The image-conditioning parameters (none for txt2img; see ImageInputFields)."""
        return {}

    def to_params(
        self,
        defaults: RequestDefaults,
        *,
        output_format: OutputFormat | None = None,
        inputs: StoredInputs | None = None,
    ) -> GenerationParams:
        """The native parameters as sent (the backend fills what is absent when it resolves them);
        `output_format` overrides the body's (a raw image answer in the format Accept asks for);
        `inputs` are the request's images once stored (api/uploads.py)."""
        options: dict[str, Any] = {}
        if self.safety_tolerance is not None:
            options["safety_tolerance"] = self.safety_tolerance
        return GenerationParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=self.width,
            height=self.height,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            num_images=self.num_images,
            scheduler=self.scheduler,
            output_format=output_format or self.output_format,
            model=defaults.model,
            loras=tuple(LoraWeight(name=lora.name, weight=lora.weight) for lora in self.loras or ()),
            backend_options=options,
            **self.image_params(inputs),
        )


class ImageInputFields(BaseModel):
    """The fields of an image-conditioned request (docs/editing.md): what each backend does with them
    depends on the model (img2img, inpainting, reference editing; GET /api/backends lists its modes)."""

    images: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Base64 or data: URLs (PNG, JPEG, WebP; never a URL to fetch): the init image, or the "
        "reference images of models that take them. At most SD_MAX_INPUT_IMAGES.",
    )
    mask: str | None = Field(None, description="Base64 or data: URL, the size of images[0]: white = repaint.")
    strength: float | None = Field(
        None,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="How much of the init image is repainted (img2img 0.75, inpaint 1.0 by default); "
        "the pipeline runs int(steps x strength) steps.",
    )
    resize_mode: ResizeMode = Field(
        "resize", description="Fitting the init image to width x height: resize (stretch), crop, or fill (pad)."
    )

    def image_params(self, inputs: StoredInputs | None) -> dict[str, Any]:
        params: dict[str, Any] = {"strength": self.strength, "resize_mode": self.resize_mode}
        if inputs is not None:
            params.update(images=inputs.images, mask=inputs.mask)
        return params


class Img2ImgRequest(ImageInputFields, Txt2ImgRequest):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"prompt": "the same, in winter", "images": ["<base64>"], "strength": 0.6}]},
    )

    images: list[str] = Field(
        min_length=1,
        max_length=64,
        description="Base64 or data: URLs (PNG, JPEG, WebP; never a URL to fetch): the init image, or the "
        "reference images of models that take them. At most SD_MAX_INPUT_IMAGES.",
    )


class JobCreateRequest(ImageInputFields, Txt2ImgRequest):
    callback_url: str | None = Field(
        None, max_length=2048, description="POSTed the final job body, signed (X-Imagegen-Signature)."
    )
    priority: IntegerField = Field(0, ge=-10, le=10, description="Higher runs first; equal priorities run in order.")


# --- responses ------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    type: str
    message: str
    param: str | None = None
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


#: Errors any native route may answer (validation, bodies, overload, failures); routes add their own.
NATIVE_ERRORS = documented_errors(Dialect.NATIVE, ErrorResponse, (400, 413, 415, 422, 429, 500, 503))


class ImageOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    b64: str | None = Field(None, description="Bare base64 (no data: prefix); null for a flagged image.")
    mime_type: str | None = None
    filename: str | None = None
    url: str | None = None
    seed: int
    nsfw: bool = Field(description="Flagged by the safety checker: no content is returned.")
    width: int | None = None
    height: int | None = None


class LoraOut(BaseModel):
    name: str
    weight: float


class InputImageOut(BaseModel):
    sha256: str
    width: int
    height: int


class ParametersOut(BaseModel):
    prompt: str
    negative_prompt: str | None
    model: str
    width: int
    height: int
    steps: int | None
    guidance_scale: float | None
    scheduler: str | None
    seeds: list[int]
    num_images: int
    output_format: str
    loras: list[LoraOut] = Field(default_factory=list, description="The LoRAs applied, in order.")
    mode: Literal["txt2img", "img2img", "inpaint", "edit"] = "txt2img"
    strength: float | None = Field(None, description="img2img and inpaint: the share of the init image repainted.")
    images: list[InputImageOut] = Field(default_factory=list, description="The input images, by content hash.")
    mask: InputImageOut | None = None


class Txt2ImgResponse(BaseModel):
    id: str = Field(description="The job id (GET /api/jobs/{id}).")
    request_id: str | None
    backend: str
    model: str
    images: list[ImageOut]
    parameters: ParametersOut
    ignored_parameters: list[str] = Field(description="Parameters this backend/model does not use.")
    timings: dict[str, float]


class ProgressOut(BaseModel):
    step: int
    total: int
    fraction: float
    eta_seconds: float | None = Field(
        None, description="Seconds to the last step at the step rate measured in this run; null until known."
    )


class JobResultOut(BaseModel):
    images: list[ImageOut]
    timings: dict[str, float]


class JobOut(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    backend: str
    model: str
    priority: int
    attempts: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    queue_position: int | None
    progress: ProgressOut
    parameters: ParametersOut
    ignored_parameters: list[str]
    result: JobResultOut | None
    error: ErrorBody | None
    status_url: str
    events_url: str
    webhook: dict[str, Any] | None = None


class JobAccepted(BaseModel):
    id: str
    status: str
    queue_position: int | None
    status_url: str
    events_url: str


class JobList(BaseModel):
    jobs: list[JobOut]
    next_before: float | None = Field(description="Pass as `before` to get the next (older) page.")


class BackendHealthOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    state: Literal["ready", "loading", "unavailable", "error", "not_configured"]
    reason: str
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    loaded: bool = False


class HealthResponse(BaseModel):
    status: str = Field(
        description="ok when the default backend is ready; otherwise why not (e.g. loading, draining, "
        "redis_unreachable in a cluster)."
    )
    default_backend: str
    backends: dict[str, BackendHealthOut]
    queue: dict[str, Any]
    version: str | None = Field(None, description="With the key (or when none is set) only.")
    reason: str | None = Field(None, description="Why the job engine cannot serve now (a cluster: Redis).")
    mode: Literal["distributed"] | None = Field(None, description="Set in a cluster (SD_REDIS_URL); with the key.")
    redis: dict[str, Any] | None = Field(
        None, description="A cluster's Redis: state and location (no credentials); with the key."
    )
    workers: list[dict[str, Any]] | None = Field(None, description="A cluster's live workers; with the key.")
    warnings: list[str] | None = Field(
        None, description="A cluster's findings, e.g. an output folder not shared; with the key."
    )


class BackendOut(BackendHealthOut):
    id: str
    default: bool
    default_model: str = Field(description="The model a request naming none gets.")
    capabilities: dict[str, Any] = Field(description="What the default model accepts.")
    model_capabilities: dict[str, dict[str, Any]] | None = Field(
        None, description="Each offered model's capabilities, when the backend offers more than one."
    )


class BackendsResponse(BaseModel):
    default: str
    backends: list[BackendOut]


class StoredImageOut(BaseModel):
    name: str = Field(description="The server-chosen file name (GET/DELETE /api/images/{name}).")
    url: str
    mime_type: str
    size_bytes: int
    created_at: str = Field(description="When the file was written (its modification time), UTC.")
    metadata: dict[str, Any] | None = Field(
        None, description="The generation parameters embedded in the file (prompt, seed, model...), if any."
    )
    parameters: str | None = Field(None, description="The A1111-style parameters text embedded in the file.")


class StoredImageList(BaseModel):
    images: list[StoredImageOut]
    next_before: str | None = Field(description="Pass as `before` to get the next (older) page.")


class LoraFit(BaseModel):
    backend: str
    model: str


class LoraEntry(BaseModel):
    name: str = Field(description="What requests name (`loras[].name`, A1111's <lora:name:weight>).")
    filename: str
    size_bytes: int
    sha256: str
    family: str = Field(description="sd | sdxl | flux1 | flux2 | flux | unknown, read from the file's tensor names.")
    label: str
    cross_attention_dim: int | None = Field(description="SD families: the UNet width it was trained for.")
    layers: int = Field(description="Layers it adapts.")
    fits: list[LoraFit] = Field(description="Configured (backend, model) pairs it fits (or may: loading checks).")


class LoraList(BaseModel):
    loras: list[LoraEntry]
