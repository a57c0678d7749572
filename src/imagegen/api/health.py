"""Health, readiness, backend listing and service info."""

from __future__ import annotations

import functools
import platform
from importlib import metadata
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from imagegen import __version__
from imagegen.api.deps import ServicesDep
from imagegen.api.schemas import BackendsResponse, HealthResponse
from imagegen.backends.base import BackendState

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
def health(services: ServicesDep) -> JSONResponse:
    """Readiness: 200 when the default backend is ready; 503 while it loads or restarts, after it failed,
    while its device is past a job's deadline and not free yet ("overrun"), or while draining.

    `queue.lanes` shows what each lane's device is doing: the batch on it (jobs, since when, its
    deadline, whether it is stopping or overrun)."""
    engine = services.engine
    backends = {backend.id: backend.health().to_dict() for backend in services.registry}
    default = services.registry.default
    state = backends[default.id]["state"]
    overrun = engine.overrun(default.lane)
    ready = state == BackendState.READY.value and not engine.draining and not overrun
    if ready:
        status = "ok"
    elif engine.draining:
        status = "draining"
    elif state != BackendState.READY.value:
        status = state
    else:
        status = "overrun"
    stats = engine.stats()
    body = {
        "status": status,
        "default_backend": default.id,
        "backends": backends,
        "queue": {
            "queued": stats["queued"],
            "running": stats["running"],
            "max_queue": stats["max_queue"],
            "lanes": {
                name: {"queued": lane["queued"], "batches": lane["batches"]} for name, lane in stats["lanes"].items()
            },
        },
        "version": __version__,
    }
    return JSONResponse(body, status_code=200 if ready else 503)


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
        listed.append(
            {
                "id": backend.id,
                "default": backend.id == services.registry.default_id,
                **backend.health().to_dict(),
                **backend.info(),
                "capabilities": backend.capabilities().to_dict(),
                "lane": {
                    "name": backend.lane,
                    "overrun": engine.overrun(backend.lane),
                    "batches": engine.lane_activity(backend.lane),
                },
            }
        )
    return {"default": services.registry.default_id, "backends": listed}


@functools.cache
def _version(package: str) -> str | None:  # installed versions cannot change while the process runs
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@router.get("/info")
def info(services: ServicesDep) -> dict[str, Any]:
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
        "queue": services.engine.stats(),
        # Sizes come from a background measurement (see storage/disk_usage.py): /info never walks a folder.
        "disk": services.disk.snapshot() if services.disk is not None else None,
        "retention": {
            "days": settings.output_retention_days,
            "max_gb": settings.output_max_gb,
            "interval_seconds": settings.output_prune_interval,
        },
    }
