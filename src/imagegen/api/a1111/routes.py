"""The AUTOMATIC1111 web UI API (`/sdapi/v1/*`), as Open WebUI, SillyTavern, LibreChat, n8n community
nodes and the `webuiapi` package speak it, in front of every backend.

Every txt2img and img2img is a job of the engine (queue limits, progress, cancel apply). Errors use A1111's shape
(api/dialects.py). Model choice is limited to the configured models (api/model_catalog.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request

from imagegen.api import model_catalog
from imagegen.api.a1111 import translate as a1111_translate
from imagegen.api.a1111.samplers import SAMPLERS, SCHEDULE_TYPES
from imagegen.api.a1111.schemas import (
    A1111_ERRORS,
    CHECKPOINT_PARAM,
    A1111Checkpoint,
    A1111Img2ImgRequest,
    A1111Progress,
    A1111Sampler,
    A1111Scheduler,
    A1111Txt2ImgRequest,
    A1111Txt2ImgResponse,
    checkpoint_for,
)
from imagegen.api.deps import ServicesDep
from imagegen.api.sync_jobs import raise_for_job, renamed, run_job
from imagegen.engine.jobs import JobStatus
from imagegen.errors import (
    BackendNotConfiguredError,
    ConflictError,
    InvalidParameterError,
    NotFoundError,
    ServiceError,
)
from imagegen.storage.loras import SUFFIX

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"], responses=A1111_ERRORS)


@router.post("/txt2img", response_model=A1111Txt2ImgResponse)
async def txt2img(body: A1111Txt2ImgRequest, request: Request, services: ServicesDep) -> dict[str, Any]:
    """A1111 txt2img: generate and wait; `images` are bare base64 PNGs, `info` a JSON string."""
    plan = a1111_translate.plan(body, services.registry, services.settings)  # its errors name A1111 fields
    job = await run_job(
        services,
        request,
        plan.params,
        plan.backend_id,
        on_error=lambda error: renamed(error, a1111_translate.A1111_NAMES),
    )
    if job.status is not JobStatus.CANCELLED:  # interrupted: A1111 answers 200, with what it has
        raise_for_job(job)
    # Reading and base64-encoding the images happens off the event loop.
    return await asyncio.to_thread(a1111_translate.response_body, body, job, plan, services.outputs)


@router.post("/img2img", response_model=A1111Txt2ImgResponse)
async def img2img(body: A1111Img2ImgRequest, request: Request, services: ServicesDep) -> dict[str, Any]:
    """A1111 img2img: init_images (and mask: inpainting), denoising_strength, resize_mode; answered like
    txt2img. Options this service does not have are listed in info.ignored_parameters."""

    def rename(error: ServiceError) -> ServiceError:
        return renamed(error, a1111_translate.A1111_NAMES)

    try:
        inputs = await asyncio.to_thread(a1111_translate.store_inputs, body, services.inputs, services.settings)
        plan = a1111_translate.plan(body, services.registry, services.settings, inputs)
    except ServiceError as error:
        raise rename(error) from None
    job = await run_job(services, request, plan.params, plan.backend_id, on_error=rename)
    if job.status is not JobStatus.CANCELLED:
        raise_for_job(job)
    return await asyncio.to_thread(a1111_translate.response_body, body, job, plan, services.outputs)


# -- options: the service's default checkpoint ---------------------------------------------------


@router.get("/options")
async def get_options(services: ServicesDep) -> dict[str, Any]:
    """The options A1111 clients read; `sd_model_checkpoint` is the default backend and model now."""
    current = model_catalog.current(services.registry)
    # Deliberately no `forge_preset`: SillyTavern takes its presence to mean a Forge server.
    return {
        "sd_model_checkpoint": current.title,
        "sd_checkpoint_hash": current.sha256,
        "sd_vae": "Automatic",
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
    }


@router.post("/options")
async def set_options(services: ServicesDep, body: Annotated[dict[str, Any], Body()]) -> None:
    """Change the default checkpoint (in memory, until restart). Other keys are accepted and ignored."""
    name = body.get("sd_model_checkpoint")
    if name is None:
        return None
    if not isinstance(name, str):
        raise InvalidParameterError("must be a checkpoint title (a string)", param="sd_model_checkpoint")
    registry = services.registry
    current = model_catalog.current(registry)
    if name == current.title:
        return None  # clients post the whole dict back: an unchanged value is never an error
    try:
        pair = checkpoint_for(registry, name)
    except InvalidParameterError as error:
        raise renamed(error, {CHECKPOINT_PARAM: "sd_model_checkpoint"}) from None
    if pair != current:
        available = registry.get(pair.backend).availability()
        if not available.accepts_jobs:
            raise BackendNotConfiguredError(
                f"checkpoint's backend '{pair.backend}' is {available.state.value}: {available.reason}",
                param="sd_model_checkpoint",
            )
        registry.set_default(pair.backend, pair.model)
    return None


# -- what there is to choose from ----------------------------------------------------------------


@router.get("/sd-models", response_model=list[A1111Checkpoint])
async def sd_models(services: ServicesDep) -> list[dict[str, Any]]:
    """Every configured (backend, model) pair whose backend can take jobs, as A1111 checkpoints."""
    return [
        {
            "title": pair.title,
            "model_name": pair.model,
            "hash": pair.short_hash,
            "sha256": pair.sha256,
            "filename": pair.model,
            "config": None,
            "backend": pair.backend,
        }
        for pair in model_catalog.checkpoints(services.registry, usable_only=True)
    ]


@router.get("/samplers", response_model=list[A1111Sampler])
async def samplers() -> list[dict[str, Any]]:
    """The A1111 sampler names accepted (each maps onto a diffusers scheduler; docs/compat.md)."""
    return [
        {
            "name": sampler.name,
            "aliases": [*sampler.aliases, sampler.scheduler],
            "options": {"scheduler": "karras"} if sampler.karras else {},
        }
        for sampler in SAMPLERS
    ]


@router.get("/schedulers", response_model=list[A1111Scheduler])
async def schedulers() -> list[dict[str, Any]]:
    """The schedule types honoured: automatic (the sampler's own) and karras."""
    return [
        {"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
        for name, label in SCHEDULE_TYPES
    ]


# A1111 features this service does not have, answered as "none installed" so that clients which list
# them while setting up (SillyTavern: upscalers, VAEs; webuiapi: scripts) work instead of failing.
@router.get("/upscalers")
async def upscalers() -> list[dict[str, Any]]:
    """No upscalers: only A1111's "None"."""
    return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]


@router.get("/latent-upscale-modes")
async def latent_upscale_modes() -> list[dict[str, Any]]:
    """None (no hires fix)."""
    return []


@router.get("/sd-vae")
async def sd_vae() -> list[dict[str, Any]]:
    """None: each model uses its own VAE."""
    return []


@router.get("/loras")
async def loras(services: ServicesDep) -> list[dict[str, Any]]:
    """The LoRAs in SD_LORA_DIR as A1111 lists them: `name` is what `<lora:name:weight>` takes; `path`
    is the file's name (never a server path); `metadata` the file's own (training) metadata."""
    catalog = services.registry.loras
    if catalog is None:
        return []
    entries = await asyncio.to_thread(catalog.list)
    return [
        {"name": entry.name, "alias": entry.name, "path": entry.name + SUFFIX, "metadata": entry.header.metadata}
        for entry in entries
    ]


@router.post("/refresh-loras")
async def refresh_loras(services: ServicesDep) -> None:
    """Look at SD_LORA_DIR again (new, changed and removed files). Answers null, as A1111 does."""
    if services.registry.loras is not None:
        services.registry.loras.refresh()


@router.get("/prompt-styles")
async def prompt_styles() -> list[dict[str, Any]]:
    """None."""
    return []


@router.get("/scripts")
async def scripts() -> dict[str, list[str]]:
    """No scripts or extensions."""
    return {"txt2img": [], "img2img": []}


# -- the running job: progress and interrupt -----------------------------------------------------


@router.get("/progress", response_model=A1111Progress)
async def progress(services: ServicesDep, skip_current_image: bool = False) -> dict[str, Any]:
    """The running job's progress (the longest-running one when several run), its ETA from the measured
    step rate and its live preview (`current_image`, base64 JPEG); 0 and job_count 0 when idle."""
    running = await services.engine.running()
    job_count = len(running) + int((await services.engine.stats())["queued"])
    state: dict[str, Any] = {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": "",
        "job_count": job_count,
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }
    if not running:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    job = min(running, key=lambda item: item.started_at or item.created_at)
    done = job.progress()
    elapsed = max(0.0, time.time() - (job.started_at or job.created_at))
    fraction = float(done["fraction"])
    state.update(
        job=job.id,
        job_timestamp=datetime.fromtimestamp(job.created_at, UTC).strftime("%Y%m%d%H%M%S"),
        sampling_step=done["step"],
        sampling_steps=done["total"],
    )
    eta = job.eta_seconds()
    if eta is None:  # no step rate yet: A1111's own estimate, the time so far scaled by what is left
        eta = round(elapsed / fraction - elapsed, 3) if fraction > 0 else 0.0
    preview = job.preview
    return {
        "progress": fraction,
        "eta_relative": eta,
        "state": state,
        "current_image": None
        if preview is None or skip_current_image
        else base64.b64encode(preview.data).decode("ascii"),
        "textinfo": f"{job.backend}: step {done['step']} of {done['total']}",
    }


@router.post("/interrupt")
async def interrupt(services: ServicesDep) -> dict[str, Any]:
    """Cancel the running job(s), as A1111's Interrupt button does; queued jobs go on. Answers {}."""
    for job in await services.engine.running():
        with contextlib.suppress(ConflictError, NotFoundError):  # it ended meanwhile
            await services.engine.cancel(job.id, reason="interrupted (POST /sdapi/v1/interrupt)")
    return {}
