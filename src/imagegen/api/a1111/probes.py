"""A1111 routes that clients call while they set up or inspect a server, beyond generation.

Where an answer is cheap and true it is given: `png-info` reads the parameters this service (or A1111)
embeds in an image, `refresh-checkpoints` looks at the models on disk again, `memory` reports what
/info knows, `embeddings` and `cmd-flags` say what there is. The features this service does not have
(upscaling, CLIP interrogation) answer 501 in A1111's error shape, so a client shows a clear message
instead of a 404 that reads like a wrong URL.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from imagegen.api.a1111.schemas import A1111_ERRORS
from imagegen.api.deps import ServicesDep
from imagegen.errors import InvalidParameterError, NotSupportedError
from imagegen.storage.metadata import parse_a1111_parameters, read_metadata

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"], responses=A1111_ERRORS)

_MAX_IMAGE_TEXT = 64 * 1024 * 1024  # the body limit (SD_MAX_BODY_BYTES) stops real requests long before


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str = Field(max_length=_MAX_IMAGE_TEXT, description="The image, base64 (a data: URL prefix is allowed).")


class PngInfoResponse(BaseModel):
    info: str = Field(description="The A1111 'parameters' text embedded in the image ('' when there is none).")
    items: dict[str, Any] = Field(description="The image's other text fields (this service's 'imagegen' JSON).")
    parameters: dict[str, Any] = Field(description="`info` read as A1111 reads it: Prompt, Steps, Seed, Size-1...")


def _decode_image(text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameterError("image must be base64 (optionally a data: URL)", param="image") from None
    if not data:
        raise InvalidParameterError("image is empty", param="image")
    return data


@router.post("/png-info", response_model=PngInfoResponse)
def png_info(body: PngInfoRequest) -> dict[str, Any]:
    """The generation parameters embedded in an image (PNG text chunk, JPEG/WebP EXIF), as A1111 reads them."""
    data = _decode_image(body.image)
    try:
        found = read_metadata(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - whatever the bytes are, they are not an image with metadata
        raise InvalidParameterError("image is not a PNG, JPEG or WebP image", param="image") from None
    info = str(found.get("parameters") or "")
    items: dict[str, Any] = {}
    if "imagegen" in found:
        items["imagegen"] = json.dumps(found["imagegen"], ensure_ascii=False, sort_keys=True)
    return {"info": info, "items": items, "parameters": parse_a1111_parameters(info) if info else {}}


@router.post("/refresh-checkpoints")
def refresh_checkpoints(services: ServicesDep) -> None:
    """Look at the configured models on disk again (e.g. after `imagegen models pull`). The list itself is
    the settings' allowlist (SD_MODEL_ID, SD_MODELS, ...): GET /sdapi/v1/sd-models."""
    services.registry.refresh()


@router.get("/embeddings")
def embeddings() -> dict[str, Any]:
    """No textual-inversion embeddings are loaded."""
    return {"loaded": {}, "skipped": {}}


@router.get("/cmd-flags")
def cmd_flags(services: ServicesDep) -> dict[str, Any]:
    """The few A1111 flags that describe this server: an API without A1111's own web UI."""
    return {"api": True, "nowebui": True, "api_auth": services.settings.api_key is not None}


@router.get("/memory")
def memory() -> dict[str, Any]:
    """System RAM, and the accelerator memory torch uses (what /info and /metrics know), in A1111's shape."""
    import psutil

    from imagegen.backends.local.support import accelerator_memory

    ram = psutil.virtual_memory()
    answer: dict[str, Any] = {
        "ram": {"free": ram.available, "used": ram.total - ram.available, "total": ram.total},
    }
    cuda = {kind: value for device, kind, value in accelerator_memory() if device == "cuda:0"}
    if cuda:
        total, reserved, allocated = cuda.get("total", 0), cuda.get("reserved", 0), cuda.get("allocated", 0)
        answer["cuda"] = {
            "system": {"free": max(0, total - reserved), "used": reserved, "total": total},
            "allocated": {"current": allocated, "peak": allocated},
            "reserved": {"current": reserved, "peak": reserved},
        }
    else:
        answer["cuda"] = {"error": "no CUDA device in use (torch is imported when a local backend first loads)"}
    return answer


#: The routes below that answer 501 without reading their body (see BodyGuardMiddleware).
UNREAD_PATHS = frozenset(f"/sdapi/v1/{name}" for name in ("extra-single-image", "extra-batch-images", "interrogate"))
_NOT_HERE = "this service does not offer A1111's {feature}: it generates images only (txt2img)"


# Not in the OpenAPI document: they are not features of this API, only answers for clients that probe.
@router.post("/extra-single-image", include_in_schema=False)
def extra_single_image() -> None:
    """Not supported: no upscalers or face restoration (501)."""
    raise NotSupportedError(_NOT_HERE.format(feature="upscaling and face restoration (extras)"))


@router.post("/extra-batch-images", include_in_schema=False)
def extra_batch_images() -> None:
    """Not supported: no upscalers or face restoration (501)."""
    raise NotSupportedError(_NOT_HERE.format(feature="upscaling and face restoration (extras)"))


@router.post("/interrogate", include_in_schema=False)
def interrogate() -> None:
    """Not supported: no CLIP or DeepBooru interrogation (501)."""
    raise NotSupportedError(_NOT_HERE.format(feature="CLIP / DeepBooru interrogation"))
