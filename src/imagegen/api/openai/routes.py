"""The OpenAI Images API (`POST /v1/images/generations`, `GET /v1/models`), as the `openai` SDKs,
Open WebUI, LibreChat, LiteLLM and n8n's OpenAI node speak it, in front of every backend.

Every generation is a job of the engine. Errors use OpenAI's envelope (api/dialects.py), with the
parameter named as OpenAI names it (`size`, not width).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request

from imagegen.api import model_catalog, presenters
from imagegen.api.deps import ServicesDep, absolute_base_url
from imagegen.api.openai.schemas import (
    OPENAI_ERRORS,
    ImageGenerationRequest,
    ImagesResponse,
    ModelList,
    ModelOut,
    model_entry,
)
from imagegen.api.sync_jobs import raise_for_job, renamed, run_job
from imagegen.errors import ContentModeratedError, InvalidParameterError, NotFoundError, ServiceError
from imagegen.generation import GenerationParams

router = APIRouter(prefix="/v1", tags=["openai"], responses=OPENAI_ERRORS)

#: Names n8n's legacy OpenAI node keeps (it lists only ids starting with "dall-"); both mean the
#: default backend, like every other name the service does not know.
ALIASES = ("dall-e-2", "dall-e-3")
#: Native parameter names -> OpenAI's.
OPENAI_NAMES = {"width": "size", "height": "size", "num_images": "n", "backend": "model"}
_CONTEXT = {"width": "size", "height": "size"}


def _renamed(error: ServiceError) -> ServiceError:
    return renamed(error, OPENAI_NAMES, _CONTEXT)


@router.post("/images/generations", response_model=ImagesResponse, response_model_exclude_none=True)
async def generate_images(body: ImageGenerationRequest, request: Request, services: ServicesDep) -> dict[str, Any]:
    """OpenAI image generation: b64_json (default) or url (the service's own image route, key required)."""
    if body.stream:
        raise InvalidParameterError("streaming is not supported: omit stream or set it to false", param="stream")
    pair = model_catalog.find(services.registry, body.model) if body.model else None
    backend = services.registry.get(pair.backend if pair else None)
    model = pair.model if pair else None
    width, height = body.dimensions()
    caps = backend.capabilities_for(model or backend.default_model or backend.capabilities().models[0])
    steps = body.steps_for(caps.default_steps)
    if steps is not None and body.steps is None:
        steps = min(steps, caps.max_steps, services.settings.max_steps)  # quality never exceeds the limits
    params = GenerationParams(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=body.guidance_scale,
        seed=body.seed,
        num_images=body.n or 1,
        output_format=body.output_format or "png",
        model=model,
    )
    job = await run_job(services, request, params, backend.id, on_error=_renamed)
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
    return {
        "created": int(job.finished_at or time.time()),
        "data": data,
        "background": "opaque",
        "output_format": job.request.output_format,
        "size": f"{job.request.width}x{job.request.height}",
    }


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
