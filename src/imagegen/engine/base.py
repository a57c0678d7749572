"""The job engine interface: what the routes, the CLI and the app need of a job engine.

Two engines implement it: `JobEngine` (engine/engine.py), the embedded default (SQLite, in-process
lanes), and `RedisJobEngine` (engine/distributed/engine.py), the API side of a cluster whose workers
run the jobs (docs/scale-out.md). Everything that may need I/O is a coroutine: in a cluster, reading
a job is a round trip to Redis. The per-job events of `engine/events.py` (SSE) are fed by both.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from imagegen.engine.jobs import Job, JobStatus
from imagegen.errors import ClientClosedRequestError, ServiceError
from imagegen.generation import GenerationParams

log = logging.getLogger("imagegen.engine")


@dataclass(frozen=True)
class EngineProblem:
    """Why an engine cannot serve now, for /health: its `status` word, a human reason, and when to retry."""

    status: str
    reason: str
    retry_after: int


class Engine(abc.ABC):
    """Admission, queries, waiting and cancel of jobs; running them is the implementation's business."""

    #: True once the service refuses new jobs (SIGTERM): submit answers 503.
    draining: bool = False

    def __init__(self) -> None:
        #: Synchronous callers waiting per job id (a disconnect cancels the job when none is left).
        self._sync_waiters: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------------------------
    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    def begin_drain(self) -> None:
        """Stop admitting new jobs (503); callable from a signal handler."""

    @abc.abstractmethod
    async def shutdown(self, grace: float) -> None:
        """Stop: running work gets `grace` seconds; nothing accepted is lost."""

    # -- admission -----------------------------------------------------------------------------
    @abc.abstractmethod
    async def submit(
        self,
        params: GenerationParams,
        backend_id: str | None,
        *,
        priority: int = 0,
        callback_url: str | None = None,
        request_id: str | None = None,
    ) -> Job:
        """Validate, admit (or refuse: 422, 429 + Retry-After, 503) and queue a job."""

    # -- queries -------------------------------------------------------------------------------
    @abc.abstractmethod
    async def get(self, job_id: str) -> Job:
        """The job (404 NotFoundError when unknown), with its live progress."""

    @abc.abstractmethod
    async def queue_position(self, job: Job) -> int | None:
        """Jobs ahead of a queued job in its lane; None when it is not queued."""

    @abc.abstractmethod
    async def list_jobs(
        self,
        *,
        status: JobStatus | None = None,
        backend: str | None = None,
        limit: int = 50,
        before: float | None = None,
        prompt: str | None = None,
    ) -> list[Job]:
        """Jobs newest first (`before`: created before that unix time; `prompt`: only jobs whose prompt
        contains this text, in any case)."""

    @abc.abstractmethod
    async def inputs_in_use(self) -> set[str]:
        """The content hashes of the input images unfinished jobs refer to (input retention keeps them)."""

    @abc.abstractmethod
    async def running(self) -> list[Job]:
        """The jobs running now."""

    @abc.abstractmethod
    async def stats(self) -> dict[str, Any]:
        """Counts for /health, /info and /metrics: queued, running, max_queue, draining, lanes
        ({name: {queued, busy, concurrency}}), and what the implementation adds."""

    def problem(self) -> EngineProblem | None:
        """Why the engine cannot work now (its shared store is unreachable), or None. Cheap: no I/O."""
        return None

    def overrun(self, lane_name: str) -> bool:
        """Whether a batch of this lane is past its deadline while its backend has not returned (the
        device is not free): readiness is 503 meanwhile. Cheap: no I/O. Engines that run no batches
        in this process say False."""
        return False

    def lane_activity(self, lane_name: str) -> list[dict[str, Any]]:
        """The batches on a lane's device now (jobs, since, deadline, overrun, stopping), for /health
        and /api/backends. Cheap: no I/O. Engines that run no batches in this process say []."""
        return []

    def health_details(self) -> dict[str, Any]:
        """What /health adds for this engine (a cluster: Redis, workers, warnings). Cheap: no I/O."""
        return {}

    # -- waiting and cancel --------------------------------------------------------------------
    @abc.abstractmethod
    async def wait(self, job_id: str) -> Job:
        """Wait until the job is final; return it."""

    @abc.abstractmethod
    async def cancel(self, job_id: str, reason: str = "cancelled by request") -> Job:
        """Cancel a queued job at once, a running one between two steps; 409 when already finished."""

    async def wait_sync(self, job_id: str, disconnected: Callable[[], Awaitable[Any]]) -> Job:
        """Wait for a synchronous caller; if it goes away and nobody else waits, cancel the job."""
        self._sync_waiters[job_id] = self._sync_waiters.get(job_id, 0) + 1
        waiter = asyncio.ensure_future(self.wait(job_id))
        watcher = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                return waiter.result()
        finally:
            watcher.cancel()
            if not waiter.done():
                waiter.cancel()
            remaining = self._sync_waiters.get(job_id, 1) - 1
            if remaining > 0:
                self._sync_waiters[job_id] = remaining
            else:
                self._sync_waiters.pop(job_id, None)
        if job_id not in self._sync_waiters and await self._still_active(job_id):
            log.info("job=%s caller disconnected; cancelling", job_id)
            await self.cancel(job_id, reason="the caller disconnected")
        raise ClientClosedRequestError("the caller disconnected")

    async def _still_active(self, job_id: str) -> bool:
        """Whether the job is neither final nor gone (a disconnect then cancels it)."""
        try:
            return not (await self.get(job_id)).final
        except ServiceError:  # unknown, or the store is unreachable: nothing to cancel now
            return False
