"""Turning jobs into response bodies (shared by the sync route, the job API, SSE and webhooks)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from imagegen.engine.jobs import Job
from imagegen.engine.results import StoredImage
from imagegen.errors import NotFoundError
from imagegen.storage.outputs import OutputStore


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parameters(job: Job) -> dict[str, Any]:
    request = job.request
    return {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "model": request.model,
        "width": request.width,
        "height": request.height,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "scheduler": request.scheduler,
        "seeds": list(request.seeds),
        "num_images": request.num_images,
        "output_format": request.output_format,
        "loras": [{"name": lora.name, "weight": lora.weight} for lora in request.loras],
        "mode": request.mode,
        "strength": request.strength,
        # The stored inputs by content hash (never their pixels: a job body stays small).
        "images": [image.model_dump() for image in request.images],
        "mask": request.mask.model_dump() if request.mask is not None else None,
    }


def image_url(image: StoredImage, base: str) -> str | None:
    """Where a delivered image is served; None for a flagged one. URLs are this layer's business:
    the engine's results name files only."""
    return None if image.filename is None else f"{base}/api/images/{image.filename}"


def image_b64(image: StoredImage, outputs: OutputStore) -> str | None:
    """The file's bytes in base64; None for a flagged image, or a file pruned since (the job record
    outlives its files)."""
    if image.filename is None:
        return None
    try:
        return base64.b64encode(outputs.resolve(image.filename).read_bytes()).decode("ascii")
    except (NotFoundError, OSError):
        return None


def image_body(image: StoredImage, outputs: OutputStore, base: str, *, include_b64: bool) -> dict[str, Any]:
    body = image.to_dict()
    body["url"] = image_url(image, base)
    body["b64"] = image_b64(image, outputs) if include_b64 else None
    return body


def images(job: Job, outputs: OutputStore, base: str, *, include_b64: bool) -> list[dict[str, Any]]:
    if job.result is None:
        return []
    return [image_body(image, outputs, base, include_b64=include_b64) for image in job.result.images]


def job_links(job_id: str, base: str) -> dict[str, str]:
    return {"status_url": f"{base}/api/jobs/{job_id}", "events_url": f"{base}/api/jobs/{job_id}/events"}


def job_body(
    job: Job, outputs: OutputStore, base: str, *, queue_position: int | None, include_b64: bool
) -> dict[str, Any]:
    result = None
    if job.result is not None:
        result = {
            "images": images(job, outputs, base, include_b64=include_b64),
            "timings": job.result.timings.to_dict(),
        }
    error = None
    if job.error is not None:
        error = {key: job.error.get(key) for key in ("type", "message", "param")}
        error["request_id"] = job.request_id
    return {
        "id": job.id,
        "status": job.status.value,
        "backend": job.backend,
        "model": job.request.model,
        "priority": job.priority,
        "attempts": job.attempts,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "queue_position": queue_position,
        "progress": job.progress(),
        "parameters": parameters(job),
        "ignored_parameters": list(job.request.ignored),
        "result": result,
        "error": error,
        **job_links(job.id, base),
        "webhook": webhook_state(job.webhook),
    }


def webhook_state(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """The webhook delivery state with its timestamps in the ISO format of every other timestamp
    (the engine records Unix times)."""
    if state is None:
        return None
    shown = dict(state)
    for key, value in state.items():
        if key.endswith("_at") and isinstance(value, (int, float)) and not isinstance(value, bool):
            shown[key] = iso(float(value))
    return shown


def txt2img_body(job: Job, outputs: OutputStore, base: str, request_id: str | None) -> dict[str, Any]:
    timings: dict[str, float] = {} if job.result is None else job.result.timings.to_dict()
    if job.finished_at is not None:
        timings["total_ms"] = round((job.finished_at - job.created_at) * 1000, 1)
    return {
        "id": job.id,
        "request_id": request_id,
        "backend": job.backend,
        "model": job.request.model,
        "images": images(job, outputs, base, include_b64=True),
        "parameters": parameters(job),
        "ignored_parameters": list(job.request.ignored),
        "timings": timings,
    }
