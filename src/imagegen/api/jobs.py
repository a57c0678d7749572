"""The async job API: submit, status, list, cancel, live progress (Server-Sent Events)."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent

from imagegen.api import presenters
from imagegen.api.deps import ServicesDep, base_url, request_id
from imagegen.api.dialects import Dialect, documented_errors
from imagegen.api.generate import stored_inputs
from imagegen.api.schemas import ErrorResponse, JobAccepted, JobCreateRequest, JobList, JobOut
from imagegen.api.translation import defaults_for
from imagegen.engine.jobs import Job, JobStatus, Preview
from imagegen.errors import NotFoundError
from imagegen.services import Services

router = APIRouter(tags=["jobs"])

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (401, 404)}


async def _job(job_id: str, services: ServicesDep) -> Job:
    if not _JOB_ID.fullmatch(job_id):
        raise NotFoundError("no such job")
    return await services.engine.get(job_id)


JobDep = Annotated[Job, Depends(_job)]


async def _body(job: Job, services: Services, request: Request, *, include_b64: bool) -> dict[str, Any]:
    position = await services.engine.queue_position(job)
    base = base_url(request, services.settings)
    if include_b64:  # reading and base64-encoding the files happens off the event loop
        return await asyncio.to_thread(
            presenters.job_body, job, services.outputs, base, queue_position=position, include_b64=True
        )
    return presenters.job_body(job, services.outputs, base, queue_position=position, include_b64=False)


@router.post(
    "/api/jobs",
    status_code=202,
    response_model=JobAccepted,
    responses=documented_errors(Dialect.NATIVE, ErrorResponse, (400, 401, 413, 415, 422, 429, 503)),
)
async def create_job(body: JobCreateRequest, request: Request, services: ServicesDep) -> JSONResponse:
    """Queue a generation and return at once (202) with links to its status and live events. With
    `images` (and `mask`, `strength`) it is an image-conditioned job, as on POST /api/img2img."""
    defaults = defaults_for(body, services.registry, services.settings)
    inputs = await stored_inputs(body, services)
    job = await services.engine.submit(
        body.to_params(defaults, inputs=inputs),
        defaults.backend,
        priority=body.priority,
        callback_url=body.callback_url,
        request_id=request_id(request),
    )
    links = presenters.job_links(job.id, base_url(request, services.settings))
    accepted = {
        "id": job.id,
        "status": job.status.value,
        "queue_position": await services.engine.queue_position(job),
        **links,
    }
    return JSONResponse(accepted, status_code=202, headers={"Location": links["status_url"]})


@router.get("/api/jobs", response_model=JobList, responses=_ERRORS)
async def list_jobs(
    request: Request,
    services: ServicesDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
    backend: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: Annotated[float | None, Query(ge=0, le=1e11, description="Only jobs created before (unix time).")] = None,
    prompt: Annotated[
        str | None, Query(min_length=1, max_length=200, description="Only jobs whose prompt contains this text.")
    ] = None,
) -> dict[str, Any]:
    """Recent jobs, newest first, without image data (follow each image's url)."""
    jobs = await services.engine.list_jobs(status=status, backend=backend, limit=limit, before=before, prompt=prompt)
    return {
        "jobs": [await _body(job, services, request, include_b64=False) for job in jobs],
        "next_before": jobs[-1].created_at if len(jobs) == limit else None,
    }


@router.get("/api/jobs/{job_id}", response_model=JobOut, responses=_ERRORS)
async def get_job(
    job: JobDep,
    request: Request,
    services: ServicesDep,
    include_images: Annotated[bool, Query(description="Include each image's base64 data.")] = True,
) -> dict[str, Any]:
    """A job's state, queue position, progress, and its result or error."""
    return await _body(job, services, request, include_b64=include_images)


@router.post("/api/jobs/{job_id}/cancel", response_model=JobOut, responses={**_ERRORS, 409: {"model": ErrorResponse}})
async def cancel_job(job: JobDep, request: Request, services: ServicesDep) -> dict[str, Any]:
    """Cancel a queued job at once, a running one between denoising steps (its partial image is discarded)."""
    cancelled = await services.engine.cancel(job.id)
    return await _body(cancelled, services, request, include_b64=False)


@router.delete("/api/jobs/{job_id}", response_model=JobOut, responses={**_ERRORS, 409: {"model": ErrorResponse}})
async def delete_job(job: JobDep, request: Request, services: ServicesDep) -> dict[str, Any]:
    """Same as POST /api/jobs/{id}/cancel."""
    cancelled = await services.engine.cancel(job.id)
    return await _body(cancelled, services, request, include_b64=False)


# Errors come before the stream starts, as JSON (not event-stream) bodies.
_STREAM_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {
        "description": "Error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    for code in (401, 404, 422)  # 422: a query parameter that is not valid (previews=maybe)
}


def _preview_data(preview: Preview) -> dict[str, Any]:
    return {
        "step": preview.step,
        "total": preview.total,
        "mime_type": preview.mime_type,
        "b64": base64.b64encode(preview.data).decode("ascii"),
    }


@router.get("/api/jobs/{job_id}/events", response_class=EventSourceResponse, responses=_STREAM_ERRORS)
async def job_events(
    job: JobDep,
    request: Request,
    services: ServicesDep,
    previews: Annotated[
        bool, Query(description="Also send `preview` events: a small JPEG of the current latents, base64.")
    ] = False,
) -> AsyncIterator[ServerSentEvent]:
    """Live progress as Server-Sent Events: `queued` (position), `running`, `progress` (each step, with
    `eta_seconds` from the measured step rate), with `previews=true` also `preview` (`step`, `total`,
    `mime_type`, bare base64 `b64`; every SD_PREVIEW_INTERVAL seconds on local backends), then one final
    `succeeded` | `failed` | `cancelled` carrying the job body; the stream then ends."""
    engine = services.engine
    queue = services.events.subscribe(job.id)
    try:
        current = await engine.get(job.id)
        if current.final:
            yield ServerSentEvent(
                event=current.status.value, data=await _body(current, services, request, include_b64=False)
            )
            return
        if current.status is JobStatus.QUEUED:
            yield ServerSentEvent(
                event="queued", data={"status": "queued", "queue_position": await engine.queue_position(current)}
            )
        else:
            yield ServerSentEvent(event="running", data={"status": "running", **current.progress()})
            if previews and current.preview is not None:
                yield ServerSentEvent(event="preview", data=_preview_data(current.preview))
        while True:
            event = await queue.get()
            if event.final:
                final = await engine.get(job.id)
                yield ServerSentEvent(
                    id=str(event.id), event=event.event, data=await _body(final, services, request, include_b64=False)
                )
                return
            if event.event == "preview" and not previews:
                continue
            yield ServerSentEvent(id=str(event.id), event=event.event, data=event.data)
    finally:
        services.events.unsubscribe(job.id, queue)


@router.get(
    "/api/jobs/{job_id}/preview",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, **_ERRORS},
)
def job_preview(job: JobDep) -> Response:
    """The latest live preview of a running job (a small JPEG of its current latents); 404 when there is
    none (queued, finished, a backend without previews, or none made yet)."""
    preview = job.preview
    if preview is None:
        raise NotFoundError("no preview: the job is not running on a local backend, or none was made yet")
    return Response(
        preview.data,
        media_type=preview.mime_type,
        headers={"Cache-Control": "no-store", "X-Step": str(preview.step), "X-Total-Steps": str(preview.total)},
    )
