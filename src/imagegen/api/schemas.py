"""Request and response models of the native API (`/api/*`, `/health`, `/info`).

Request models are strict (no silent type coercion; unknown keys are errors) and carry static
sanity bounds; the service limits (SD_MAX_*) and each backend's own rules are checked afterwards by
the backend's `resolve`, with messages that name the parameter.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from imagegen.api.dialects import Dialect, documented_errors
from imagegen.api.translation import RequestDefaults, Target
from imagegen.generation import SEED_MAX, GenerationParams

if TYPE_CHECKING:
    from imagegen.backends.registry import BackendRegistry

_HARD_MAX_SIDE = 16384
_HARD_MAX_TEXT = 100_000

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

    def target(self, registry: BackendRegistry) -> Target:
        return Target(registry.get(self.backend), self.model)

    def to_params(self, defaults: RequestDefaults, *, output_format: str | None = None) -> GenerationParams:
        """The native parameters as sent (the backend fills what is absent when it resolves them);
        `output_format` overrides the body's (a raw image answer in the format Accept asks for)."""
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
            output_format=output_format or self.output_format,  # type: ignore[arg-type]
            model=defaults.model,
            backend_options=options,
        )


class JobCreateRequest(Txt2ImgRequest):
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
    status: str = Field(description="ok when the default backend is ready; otherwise why not.")
    default_backend: str
    backends: dict[str, BackendHealthOut]
    queue: dict[str, Any]
    version: str


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
