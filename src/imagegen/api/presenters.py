"""Turning jobs into response bodies (shared by the sync route, the job API, SSE and webhooks)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from imagegen.engine.jobs import Job
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
    }


def images(job: Job, outputs: OutputStore, base: str, *, include_b64: bool) -> list[dict[str, Any]]:
    found = []
    for item in (job.result or {}).get("images", []):
        image = dict(item)
        image["b64"] = None
        if image.get("filename"):
            image["url"] = f"{base}/api/images/{image['filename']}"
            if include_b64:
                try:
                    image["b64"] = base64.b64encode(outputs.resolve(image["filename"]).read_bytes()).decode("ascii")
                except (NotFoundError, OSError):
                    image["b64"] = None  # pruned since: the job record outlives its files
        found.append(image)
    return found


def job_links(job_id: str, base: str) -> dict[str, str]:
    return {"status_url": f"{base}/api/jobs/{job_id}", "events_url": f"{base}/api/jobs/{job_id}/events"}


def job_body(
    job: Job, outputs: OutputStore, base: str, *, queue_position: int | None, include_b64: bool
) -> dict[str, Any]:
    result = None
    if job.result is not None:
        result = {
            "images": images(job, outputs, base, include_b64=include_b64),
            "timings": job.result.get("timings", {}),
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
        "webhook": job.webhook,
    }


def txt2img_body(job: Job, outputs: OutputStore, base: str, request_id: str | None) -> dict[str, Any]:
    timings = dict((job.result or {}).get("timings", {}))
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
