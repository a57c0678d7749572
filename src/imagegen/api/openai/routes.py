"""The OpenAI Images API (`POST /v1/images/generations`, `POST /v1/images/edits`, `GET /v1/models`), as
the `openai` SDKs, Open WebUI, LibreChat, LiteLLM and n8n's OpenAI node speak it, in front of every backend.

Every generation is a job of the engine. Errors use OpenAI's envelope (api/dialects.py), with the
parameter named as OpenAI names it (`size`, not width).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request

from imagegen.api import model_catalog, presenters, uploads
from imagegen.api.deps import ServicesDep, absolute_base_url
from imagegen.api.openai import edits
from imagegen.api.openai.schemas import (
    EDIT_REQUEST_BODY,
    OPENAI_ERRORS,
    ImageGenerationRequest,
    ImagesResponse,
    ModelList,
    ModelOut,
    model_entry,
)
from imagegen.api.sync_jobs import raise_for_job, renamed, run_job
from imagegen.api.translation import defaults_for
from imagegen.engine.jobs import Job
from imagegen.errors import ContentModeratedError, NotFoundError, ServiceError
from imagegen.services import Services
from imagegen.storage.image_decoding import mask_from_transparency, transparency_mask

router = APIRouter(prefix="/v1", tags=["openai"], responses=OPENAI_ERRORS)

#: Names n8n's legacy OpenAI node keeps (it lists only ids starting with "dall-"); both mean the
#: default backend, like every other name the service does not know.
ALIASES = ("dall-e-2", "dall-e-3")
#: Native parameter names -> OpenAI's.
OPENAI_NAMES = {"width": "size", "height": "size", "num_images": "n", "backend": "model", "images": "image"}
_CONTEXT = {"width": "size", "height": "size"}


def _renamed(error: ServiceError) -> ServiceError:
    return renamed(error, OPENAI_NAMES, _CONTEXT)


@router.post("/images/generations", response_model=ImagesResponse, response_model_exclude_none=True)
async def generate_images(body: ImageGenerationRequest, request: Request, services: ServicesDep) -> dict[str, Any]:
    """OpenAI image generation: b64_json (default) or url (the service's own image route, key required)."""
    defaults = defaults_for(body, services.registry, services.settings)
    job = await run_job(services, request, body.to_params(defaults), defaults.backend, on_error=_renamed)
    return await _answer(job, body, request, services)


@router.post(
    "/images/edits",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    openapi_extra=EDIT_REQUEST_BODY,
)
async def edit_images(request: Request, services: ServicesDep) -> dict[str, Any]:
    """OpenAI image edits: `image` (or several `image[]`), an optional `mask` whose transparent pixels mark
    the area to edit, and the generation fields; multipart (as the SDK sends it) or JSON with base64.
    What each backend does with the images: docs/editing.md. Unused fields are in `ignored_parameters`."""
    settings = services.settings
    try:
        form = await edits.read_edit(request, settings)
        defaults = defaults_for(form.body, services.registry, settings)
        inputs = await asyncio.to_thread(
            uploads.prepare,
            services.inputs,
            settings,
            form.images,
            form.mask,
            mask_rule=lambda found: mask_from_transparency(found, param="mask"),
            implicit_mask=transparency_mask,  # no mask: the image's own transparent pixels, as OpenAI reads it
        )
    except ServiceError as error:
        raise _renamed(error) from None
    params = form.body.to_edit_params(defaults, inputs)
    job = await run_job(services, request, params, defaults.backend, on_error=_renamed)
    return await _answer(job, form.body, request, services, form.ignored)


async def _answer(
    job: Job, body: ImageGenerationRequest, request: Request, services: Services, ignored: list[str] | None = None
) -> dict[str, Any]:
    raise_for_job(job)
    # Flagged images are left out: `data` may hold fewer than n images (never an unsafe one).
    delivered = job.result.delivered() if job.result is not None else []
    if not delivered:
        raise ContentModeratedError("the safety checker flagged every image; no content is returned")
    if body.response_format == "url":
        base = absolute_base_url(request, services.settings)
        data = [{"url": presenters.image_url(image, base)} for image in delivered]
    else:
        # Reading and base64-encoding the images happens off the event loop.
        encoded = await asyncio.to_thread(
            lambda: [presenters.image_b64(image, services.outputs) for image in delivered]
        )
        data = [{"b64_json": b64} for b64 in encoded]
    answer: dict[str, Any] = {
        "created": int(job.finished_at or time.time()),
        "data": data,
        "background": "opaque",
        "output_format": job.request.output_format,
        "size": f"{job.request.width}x{job.request.height}",
    }
    if ignored is not None:
        names = {OPENAI_NAMES.get(name, name) for name in job.request.ignored}
        answer["ignored_parameters"] = sorted({*ignored, *names})
    return answer


def _models(services: ServicesDep) -> list[dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    usable = [backend for backend in services.registry if model_catalog.usable(backend)]
    for backend in sorted(usable, key=lambda item: item.id != services.registry.default_id):
        entries.setdefault(backend.id, model_entry(backend.id, "imagegen"))
    for pair in model_catalog.checkpoints(services.registry, usable_only=True):
        entries.setdefault(pair.model, model_entry(pair.model, pair.backend))
    for alias in ALIASES:
        entries.setdefault(alias, model_entry(alias, "imagegen"))
    return list(entries.values())


@router.get("/models", response_model=ModelList)
async def list_models(services: ServicesDep) -> dict[str, Any]:
    """The backends, their models, and the dall-e-2 / dall-e-3 aliases of the default backend."""
    return {"object": "list", "data": _models(services)}


@router.get("/models/{model_id:path}", response_model=ModelOut)
async def retrieve_model(model_id: str, services: ServicesDep) -> dict[str, Any]:
    """One entry of GET /v1/models."""
    for entry in _models(services):
        if entry["id"] == model_id:
            return entry
    raise NotFoundError("no such model (GET /v1/models lists them)", param="model")
