"""What every synchronous generation route shares (/api/txt2img, the A1111 and OpenAI dialects): a
synchronous call is a job like any other (queue limits, progress, cancel, persistence), a caller that
disconnects cancels it, and errors name the parameter the way the caller's dialect does."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request

from imagegen.api.deps import request_id
from imagegen.engine.jobs import Job, JobStatus
from imagegen.errors import ServiceError
from imagegen.generation import GenerationParams
from imagegen.services import Services


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_job(
    services: Services,
    request: Request,
    params: GenerationParams,
    backend_id: str | None,
    *,
    on_error: Callable[[ServiceError], ServiceError] = lambda error: error,
) -> Job:
    """Submit a job and wait for it to end (a caller that disconnects cancels it, as on /api/txt2img).

    Returns the final job, whatever its state; `on_error` rewrites admission errors (validation,
    queue full) into the caller's terms before they are raised."""
    try:
        job = await services.engine.submit(params, backend_id, request_id=request_id(request))
    except ServiceError as error:
        raise on_error(error) from None

    def waiter() -> Awaitable[None]:
        return _disconnected(request)

    return await services.engine.wait_sync(job.id, waiter)


def raise_for_job(job: Job) -> None:
    """Raise the error a finished job ended with (its stored status code), unless it succeeded."""
    if job.status is JobStatus.SUCCEEDED:
        return
    error = job.error or {"type": "generation_failed", "message": "the job did not succeed"}
    raise ServiceError.from_dict(error, int(error.get("status_code", 500)))


def renamed(error: ServiceError, names: dict[str, str], prefix: dict[str, str] | None = None) -> ServiceError:
    """The same error, its `param` in the dialect's words (width -> size, guidance_scale -> cfg_scale).

    `prefix` adds context to the message where the dialect's parameter differs from the one named in
    it ("size: width must be a multiple of 8")."""
    if error.param in names:
        original = error.param
        error.param = names[original]
        if prefix and original in prefix:
            error.message = f"{prefix[original]}: {error.message}"
    return error
