"""Health, readiness, backend listing and service info."""

from __future__ import annotations

import functools
import platform
from importlib import metadata
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from imagegen import __version__
from imagegen.api.deps import ServicesDep
from imagegen.api.schemas import BackendsResponse, HealthResponse
from imagegen.backends.base import BackendState
from imagegen.engine.base import EngineProblem
from imagegen.errors import ServiceError

router = APIRouter(tags=["health"])


def sees_details(request: Request, services: ServicesDep) -> bool:
    """Whether the caller of a public route may see more than states and reasons: no key is set, or
    it sent the key (ApiKeyMiddleware checks it on public routes too, without refusing)."""
    if services.settings.api_key is None:
        return True
    return bool(request.scope.get("state", {}).get("authenticated"))


def _public(backend: dict[str, Any]) -> dict[str, Any]:
    """A backend's state and reason as anyone may read them: a ready backend's reason carries details
    (the BFL host and credit balance), so it reads "ready"; other reasons say what to fix."""
    ready = backend["state"] == BackendState.READY.value
    return {"state": backend["state"], "reason": "ready" if ready else backend["reason"]}


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(request: Request, services: ServicesDep) -> JSONResponse:
    """Readiness: 200 when the default backend is ready; 503 while it loads or restarts, after it failed,
    while its device is past a job's deadline and not free yet ("overrun"), while draining, or (in a
    cluster) while Redis is unreachable or no worker serves the default backend.
    Without the key (when one is set): states and reasons only; with it, each backend's details too
    (model, device, memory, BFL host and credits, the device process), the version, what each lane's
    device is doing (`queue.lanes`: the batch on it, since when, its deadline, whether it is stopping or
    overrun) and a cluster's Redis and workers."""
    engine = services.engine
    backends = {backend.id: backend.health().to_dict() for backend in services.registry}
    default = services.registry.default
    state = backends[default.id]["state"]
    problem = engine.problem()
    headers: dict[str, str] = {}
    stats: dict[str, Any] | None = None
    if problem is None:
        try:
            stats = await engine.stats()
        except ServiceError as error:  # the store went away between two looks
            problem = EngineProblem("unavailable", error.message, 2)
    overrun = engine.overrun(default.lane)
    ready = problem is None and state == BackendState.READY.value and not engine.draining and not overrun
    if problem is not None:
        status = problem.status
        headers["Retry-After"] = str(problem.retry_after)
    elif ready:
        status = "ok"
    elif engine.draining:
        status = "draining"
    elif state != BackendState.READY.value:
        status = state
    else:
        status = "overrun"
    queue: dict[str, Any] = {"queued": None, "running": None, "max_queue": services.settings.max_queue}
    if stats is not None:
        queue = {"queued": stats["queued"], "running": stats["running"], "max_queue": stats["max_queue"]}
    details = sees_details(request, services)
    if details and stats is not None:
        queue["lanes"] = {
            name: {"queued": lane["queued"], "batches": lane.get("batches", [])}
            for name, lane in stats["lanes"].items()
        }
    body: dict[str, Any] = {
        "status": status,
        "default_backend": default.id,
        "backends": backends if details else {name: _public(backend) for name, backend in backends.items()},
        "queue": queue,
    }
    if problem is not None:
        body["reason"] = problem.reason
    if details:
        body["version"] = __version__
        body.update(engine.health_details())
    return JSONResponse(body, status_code=200 if ready else 503, headers=headers)


@router.get("/health/live")
def live() -> dict[str, str]:
    """Liveness: 200 while the process runs."""
    return {"status": "alive"}


@router.get("/api/backends", response_model=BackendsResponse)
def backends(services: ServicesDep) -> dict[str, Any]:
    """Every backend: availability, model, device, dtype, capabilities and limits, and what its lane's
    device is doing now (`lane`: the batch on it, since when, its deadline, overrun or stopping)."""
    listed = []
    engine = services.engine
    for backend in services.registry:
        capabilities = backend.capabilities()
        entry = {
            "id": backend.id,
            "default": backend.id == services.registry.default_id,
            **backend.health().to_dict(),
            **backend.info(),
            "default_model": backend.default_model_id(),
            "capabilities": capabilities.to_dict(),
            "lane": {
                "name": backend.lane,
                "overrun": engine.overrun(backend.lane),
                "batches": engine.lane_activity(backend.lane),
            },
        }
        if len(capabilities.models) > 1:  # sizes and defaults differ per model (an SDXL beside an SD 1.5)
            entry["model_capabilities"] = {
                model: backend.capabilities_for(model).to_dict() for model in capabilities.models
            }
        listed.append(entry)
    return {"default": services.registry.default_id, "backends": listed}


@functools.cache
def _version(package: str) -> str | None:  # installed versions cannot change while the process runs
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _speed_modes(services: ServicesDep) -> dict[str, Any]:
    """SD_COMPILE / SD_QUANTIZE as set, and per local backend what its last load made of them (on, warmed
    sizes, or why refused); a backend that has not loaded yet has no entry."""
    settings = services.settings
    applied = {}
    for backend in services.registry:
        status = backend.health().details.get("speed_modes")
        if status is not None:
            applied[backend.id] = status
    return {
        "compile": settings.compile,
        "compile_sizes": list(settings.compile_sizes),
        "compile_backend": settings.compile_backend,
        "quantize": settings.quantize,
        "backends": applied,
    }


@router.get("/info")
async def info(services: ServicesDep) -> dict[str, Any]:
    """Version, default backend, devices seen, library versions, limits, directories. No secrets."""
    settings = services.settings
    return {
        "name": "imagegen",
        "version": __version__,
        "default_backend": services.registry.default_id,
        "backends": services.registry.ids(),
        "devices": {
            "setting": settings.device,
            "isolation": settings.device_isolation,
            **services.registry.devices_seen(),
        },
        "versions": {
            "python": platform.python_version(),
            **{name: _version(name) for name in ("torch", "diffusers", "transformers", "fastapi", "pillow")},
        },
        "limits": {
            "max_width": settings.max_width,
            "max_height": settings.max_height,
            "max_pixels": settings.max_pixels,
            "max_steps": settings.max_steps,
            "max_images": settings.max_images,
            "max_loras": settings.max_loras,
            "max_prompt_chars": settings.max_prompt_chars,
            "max_body_bytes": settings.max_body_bytes,
            "max_queue": settings.max_queue,
            "max_batch": settings.max_batch,
            "job_timeout_seconds": settings.job_timeout,
            "queue_timeout_seconds": settings.queue_timeout or None,
        },
        "output_dir": str(services.outputs.root),
        "model_dir": str(settings.model_dir.resolve()),
        "data_dir": str(settings.data_dir.resolve()),
        "auth_enabled": settings.api_key is not None,
        "safety_checker": settings.safety_checker,
        "speed_modes": _speed_modes(services),
        "queue": await services.engine.stats(),
        # Sizes come from a background measurement (see storage/disk_usage.py): /info never walks a folder.
        "disk": services.disk.snapshot() if services.disk is not None else None,
        "retention": {
            "days": settings.output_retention_days,
            "max_gb": settings.output_max_gb,
            "interval_seconds": settings.output_prune_interval,
        },
    }
