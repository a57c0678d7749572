"""Request and response models of the OpenAI Images dialect (`/v1/images/generations`, `/v1/models`).

Every field of OpenAI's image generation request is accepted; those without a meaning here (`style`,
`user`, `moderation`, ...) are ignored, and unknown keys too (LiteLLM and other proxies add their
own). A few extensions, sent by scripts through `extra_body`, reach the native parameters.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from imagegen.api import model_catalog
from imagegen.api.dialects import Dialect, documented_errors
from imagegen.api.translation import RequestDefaults, Target
from imagegen.errors import InvalidParameterError
from imagegen.generation import SEED_MAX, GenerationParams

if TYPE_CHECKING:
    from imagegen.backends.registry import BackendRegistry

_HARD_MAX_TEXT = 100_000
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"prompt": "a lighthouse at dawn", "model": "sd", "size": "512x512", "n": 1}]},
    )

    prompt: str = Field(min_length=1, max_length=_HARD_MAX_TEXT)
    model: str | None = Field(
        None,
        max_length=256,
        description="A backend id, a model id or checkpoint title (GET /v1/models); anything else (dall-e-3, "
        "gpt-image-1) means the default backend.",
    )
    n: int | None = Field(1, ge=1, le=64)
    size: str | None = Field(None, max_length=32, description="WIDTHxHEIGHT, or auto (the model's native size).")
    quality: Literal["auto", "standard", "hd", "low", "medium", "high", "xhigh", "max"] | None = Field(
        None, description="low: half the model's default steps; hd/high/xhigh/max: 1.5x; others: the default."
    )
    response_format: Literal["b64_json", "url"] | None = Field(None, description="Absent: b64_json.")
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100, description="Accepted, ignored.")
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        None, description="Images are always opaque (the answer says so)."
    )
    style: Literal["vivid", "natural"] | None = None
    moderation: Literal["low", "auto"] | None = Field(None, description="Ignored: SD_SAFETY_CHECKER decides.")
    user: str | None = Field(None, max_length=256)
    safety_identifier: str | None = Field(None, max_length=256)
    stream: bool | None = Field(None, description="Streaming is not offered: true is a 400.")
    partial_images: int | None = None
    # Extensions (not OpenAI's): the native parameters scripts most often want.
    negative_prompt: str | None = Field(None, max_length=_HARD_MAX_TEXT)
    seed: int | None = Field(None, ge=-1, le=SEED_MAX)
    steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)

    def dimensions(self) -> tuple[int | None, int | None]:
        """(width, height) from `size`; (None, None) for auto or absent (the model's native size)."""
        if self.size is None or self.size.strip().lower() in ("", "auto"):
            return None, None
        match = _SIZE.match(self.size)
        if match is None:
            raise InvalidParameterError("size must be 'auto' or WIDTHxHEIGHT, e.g. 512x512", param="size")
        return int(match.group(1)), int(match.group(2))

    def steps_for(self, default_steps: int | None) -> int | None:
        """Steps from `quality` (an explicit `steps` wins); None leaves the model's default."""
        if self.steps is not None or default_steps is None:
            return self.steps
        if self.quality == "low":
            return max(1, round(default_steps / 2))
        if self.quality in ("hd", "high", "xhigh", "max"):
            return round(default_steps * 1.5)
        return None

    # -- translation (api/translation.py) ---------------------------------------------------------
    def target(self, registry: BackendRegistry) -> Target:
        """What `model` names (GET /v1/models); a name the service does not know (dall-e-3,
        gpt-image-1) means the default backend."""
        pair = model_catalog.find(registry, self.model) if self.model else None
        if pair is None:
            return Target(registry.get(None))
        return Target(registry.get(pair.backend), pair.model)

    def to_params(self, defaults: RequestDefaults) -> GenerationParams:
        if self.stream:
            raise InvalidParameterError("streaming is not supported: omit stream or set it to false", param="stream")
        width, height = self.dimensions()
        steps = self.steps_for(defaults.default_steps)
        if steps is not None and self.steps is None:
            steps = min(steps, defaults.max_steps)  # quality never exceeds the limits
        return GenerationParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            num_images=self.n or 1,
            output_format=self.output_format or "png",
            model=defaults.model,
        )


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque"] = "opaque"
    output_format: str
    size: str
    ignored_parameters: list[str] | None = Field(
        None, description="Edits only (extension): fields sent that changed nothing here."
    )


_EDIT_FIELDS: dict[str, Any] = {
    "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP (sniffed from the bytes)."},
    "image[]": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "Several images."},
    "mask": {"type": "string", "format": "binary", "description": "Transparent pixels mark the area to edit."},
    "prompt": {"type": "string"},
    "model": {"type": "string"},
    "n": {"type": "integer"},
    "size": {"type": "string"},
    "response_format": {"type": "string", "enum": ["b64_json", "url"]},
    "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"]},
    "strength": {"type": "number", "description": "Extension: img2img/inpaint strength (0, 1]."},
}
#: The request body of POST /v1/images/edits for the OpenAPI document (the route parses it itself).
EDIT_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["image", "prompt"], "properties": _EDIT_FIELDS}
            },
        },
    }
}


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


def model_entry(model_id: str, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owned_by}


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error envelope, which every /v1/ error uses."""

    error: OpenAIErrorBody


#: Documented on every /v1/ route (invalid parameters are 400 in this dialect, as OpenAI answers).
OPENAI_ERRORS = documented_errors(
    Dialect.OPENAI, OpenAIErrorResponse, (400, 401, 402, 404, 413, 415, 422, 429, 500, 502, 503, 504)
)
