"""The job engine: admission, one bounded queue, lanes of workers, batching, persistence, cancel.

A request becomes a job (persisted before it is acknowledged), waits in its lane's queue (local
backends share the device lane; the cloud backend has its own, with its own concurrency), runs,
possibly merged with compatible queued jobs into one pipeline call, and ends in exactly one final
state. Everything here runs on the event loop's thread, except the backends' own worker threads,
which report progress back through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from imagegen.backends.base import PREVIEW_MIME_TYPE, ImageBackend, RunContext
from imagegen.backends.registry import BackendRegistry
from imagegen.config import Settings
from imagegen.engine.base import Engine
from imagegen.engine.batching import max_images, select_batch
from imagegen.engine.events import JobEvents
from imagegen.engine.images import store_images
from imagegen.engine.jobs import Job, JobStatus, Preview, new_job_id
from imagegen.engine.results import JobResult, StoredImage, Timings
from imagegen.engine.store import JobStore
from imagegen.errors import (
    BackendNotConfiguredError,
    BackendUnavailableError,
    ConflictError,
    DeadlineExceededError,
    GenerationFailedError,
    JobCancelledError,
    NotFoundError,
    QueueFullError,
    ServiceDrainingError,
    ServiceError,
)
from imagegen.generation import GeneratedImage, GenerationParams
from imagegen.storage.outputs import OutputStore

log = logging.getLogger("imagegen.engine")


class Lane:
    """A priority queue of jobs (highest priority first, then first come) and its workers."""

    def __init__(self, name: str, concurrency: int) -> None:
        self.name = name
        self.concurrency = max(1, concurrency)
        self._queue: list[tuple[int, int, Job]] = []  # (-priority, seq, job), kept sorted
        self._wakeup = asyncio.Event()
        self.workers: list[asyncio.Task[None]] = []
        self.busy = 0

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, job: Job, seq: int) -> None:
        bisect.insort(self._queue, (-job.priority, seq, job), key=lambda item: (item[0], item[1]))
        self._wakeup.set()

    def remove(self, job_id: str) -> bool:
        for index, (_, _, job) in enumerate(self._queue):
            if job.id == job_id:
                del self._queue[index]
                return True
        return False

    def jobs(self) -> list[Job]:
        return [job for _, _, job in self._queue]

    def position(self, job_id: str) -> int | None:
        for index, (_, _, job) in enumerate(self._queue):
            if job.id == job_id:
                return index
        return None

    def pop_batch(self, max_images: Callable[[Job], int]) -> list[Job]:
        """The head job plus compatible queued jobs (same batch key) while the images fit
        (engine/batching.py: the rule the distributed workers follow too)."""
        chosen = select_batch(self.jobs(), max_images)
        picked = set(chosen)
        batch = [self._queue[index][2] for index in chosen]
        self._queue = [item for index, item in enumerate(self._queue) if index not in picked]
        return batch

    def wake(self) -> None:
        self._wakeup.set()

    async def wait(self) -> None:
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
            if not self._queue:
                return  # woken without work (shutdown): let the worker re-check


class JobEngine(Engine):
    """The embedded engine: one process, jobs in SQLite, lanes of asyncio workers."""

    def __init__(
        self,
        settings: Settings,
        registry: BackendRegistry,
        store: JobStore,
        outputs: OutputStore,
        events: JobEvents,
        webhooks: Any = None,
        on_final: Callable[[Job], None] | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.registry = registry
        self.store = store
        self.outputs = outputs
        self.events = events
        self.webhooks = webhooks
        self._on_final = on_final
        self._lanes: dict[str, Lane] = {}
        self._active: dict[str, Job] = {}
        self._done: dict[str, asyncio.Future[Job]] = {}
        self._contexts: dict[str, tuple[RunContext, int]] = {}
        self._seq = itertools.count()
        self._durations: deque[float] = deque(maxlen=32)
        self._background: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.draining = False

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for backend in self.registry:
            lane = self._lanes.get(backend.lane)
            if lane is None:
                self._lanes[backend.lane] = Lane(backend.lane, backend.concurrency)
            else:
                lane.concurrency = max(lane.concurrency, backend.concurrency)
        self._recover()
        for lane in self._lanes.values():
            for index in range(lane.concurrency):
                lane.workers.append(asyncio.create_task(self._worker(lane), name=f"worker-{lane.name}-{index}"))

    def begin_drain(self) -> None:
        """Stop admitting new jobs (503) and starting queued ones; running batches go on.

        Queued jobs stay queued in the store for the next start; a synchronous caller waiting on
        one is answered 503 now rather than when the connection is dropped."""
        if self.draining:
            return
        log.info("draining: new jobs are refused; queued jobs stay in the store for the next start")
        self.draining = True
        for lane in self._lanes.values():
            for job in lane.jobs():
                self._release_waiter(job.id)
            lane.wake()

    async def shutdown(self, grace: float) -> None:
        """Let running batches finish within `grace` seconds; queued jobs stay queued in the store."""
        self.begin_drain()
        self._stopping = True
        workers = [task for lane in self._lanes.values() for task in lane.workers]
        for lane in self._lanes.values():
            lane.wake()
        if workers:
            _, pending = await asyncio.wait(workers, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._background:
            await asyncio.wait(self._background, timeout=max(1.0, min(grace, 10.0)))
        for job_id in list(self._done):
            self._release_waiter(job_id)

    def _release_waiter(self, job_id: str) -> None:
        """Answer a synchronous caller 503 now: its job stays queued in the store for the next start."""
        future = self._done.get(job_id)
        if future is not None and not future.done():
            future.set_exception(
                ServiceDrainingError(f"the service is shutting down; job {job_id} stays queued and runs after restart")
            )
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits

    def _recover(self) -> None:
        """Resume what a previous process accepted: queued jobs run again, an interrupted running job
        is retried up to SD_MAX_ATTEMPTS times, then fails with a reason (no poison loop)."""
        known = set(self.registry.ids())
        for job in self.store.unfinished():
            if job.backend not in known:
                self._finalize(
                    job,
                    JobStatus.FAILED,
                    error=BackendUnavailableError(f"backend '{job.backend}' is not configured any more"),
                )
                continue
            if job.status is JobStatus.RUNNING:
                if job.attempts >= self.settings.max_attempts:
                    self._finalize(
                        job,
                        JobStatus.FAILED,
                        error=GenerationFailedError(
                            f"the service stopped while this job was running ({job.attempts} attempt(s)); "
                            "not retried again (SD_MAX_ATTEMPTS)"
                        ),
                    )
                    continue
                job.status = JobStatus.QUEUED
                job.started_at = None
                self.store.update(job)
            log.info("recovered job=%s backend=%s attempts=%d", job.id, job.backend, job.attempts)
            self._enqueue(job)

    # -- admission -----------------------------------------------------------------------------
    async def submit(
        self,
        params: GenerationParams,
        backend_id: str | None,
        *,
        priority: int = 0,
        callback_url: str | None = None,
        request_id: str | None = None,
    ) -> Job:
        if self.draining:
            raise ServiceDrainingError("the service is shutting down and accepts no new jobs")
        backend = self.registry.get(backend_id)
        available = backend.availability()
        if not available.accepts_jobs:  # before the parameters: they cannot make it run; a 4xx, no retry helps
            raise BackendNotConfiguredError(
                f"backend '{backend.id}' is {available.state.value}: {available.reason}", param="backend"
            )
        request = backend.resolve(params)
        if callback_url is not None and self.webhooks is not None:
            self.webhooks.validate(callback_url)
        queued = self.queued_count()
        if queued >= self.settings.max_queue:
            raise QueueFullError(
                f"the queue is full ({queued} jobs waiting, SD_MAX_QUEUE={self.settings.max_queue}); retry later",
                retry_after=self.retry_after(),
            )
        job = Job(id=new_job_id(), request=request, priority=priority, callback_url=callback_url, request_id=request_id)
        self.store.add(job)
        self._enqueue(job)
        log.info(
            "job=%s queued backend=%s images=%d request_id=%s",
            job.id,
            job.backend,
            request.num_images,
            request_id,
            extra={"job_id": job.id, "backend": job.backend, "status": "queued"},
        )
        return job

    def _enqueue(self, job: Job) -> None:
        assert self._loop is not None, "engine not started"
        lane = self._lane_of(job)
        self._active[job.id] = job
        self._done[job.id] = self._loop.create_future()
        lane.push(job, next(self._seq))
        self.events.publish(job.id, "queued", {"status": "queued", "queue_position": lane.position(job.id)})

    def _lane_of(self, job: Job) -> Lane:
        return self._lanes[self.registry.get(job.backend).lane]

    def queued_count(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    def _running(self) -> list[Job]:
        return [job for job in self._active.values() if job.status is JobStatus.RUNNING]

    async def running(self) -> list[Job]:
        """The jobs running now (from memory: every active job is here)."""
        return self._running()

    def running_count(self) -> int:
        return len(self._running())

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: recent batch time x queue length / concurrency."""
        average = sum(self._durations) / len(self._durations) if self._durations else 5.0
        concurrency = sum(lane.concurrency for lane in self._lanes.values()) or 1
        estimate = average * max(1, self.queued_count()) / concurrency
        return max(1, min(300, math.ceil(estimate)))

    async def stats(self) -> dict[str, Any]:
        return {
            "queued": self.queued_count(),
            "running": self.running_count(),
            "max_queue": self.settings.max_queue,
            "draining": self.draining,
            "lanes": {
                name: {"queued": len(lane), "busy": lane.busy, "concurrency": lane.concurrency}
                for name, lane in self._lanes.items()
            },
        }

    # -- queries -------------------------------------------------------------------------------
    async def get(self, job_id: str) -> Job:
        return self._get(job_id)

    def _get(self, job_id: str) -> Job:
        job = self._active.get(job_id)
        if job is not None:
            return job
        stored = self.store.get(job_id)
        if stored is None:
            raise NotFoundError("no such job")
        return stored

    async def inputs_in_use(self) -> set[str]:
        """The content hashes of the input images unfinished jobs refer to (input retention keeps them)."""
        found: set[str] = set()
        for job in self._active.values():
            found.update(image.sha256 for image in job.request.images)
            if job.request.mask is not None:
                found.add(job.request.mask.sha256)
        return found

    async def queue_position(self, job: Job) -> int | None:
        if job.status is not JobStatus.QUEUED or job.id not in self._active:
            return None
        return self._lane_of(job).position(job.id)

    async def list_jobs(
        self,
        *,
        status: JobStatus | None = None,
        backend: str | None = None,
        limit: int = 50,
        before: float | None = None,
        prompt: str | None = None,
    ) -> list[Job]:
        # The store has every job; active ones are fresher in memory (live progress).
        found = self.store.list_jobs(status=status, backend=backend, limit=limit, before=before, prompt=prompt)
        return [self._active.get(job.id, job) for job in found]

    async def wait(self, job_id: str) -> Job:
        """Wait until the job is final; return it."""
        future = self._done.get(job_id)
        if future is None:
            return self._get(job_id)
        return await asyncio.shield(future)

    async def _still_active(self, job_id: str) -> bool:
        return job_id in self._active

    # -- cancel --------------------------------------------------------------------------------
    async def cancel(self, job_id: str, reason: str = "cancelled by request") -> Job:
        job = self._active.get(job_id)
        if job is None:
            stored = self._get(job_id)
            if stored.status is JobStatus.CANCELLED:
                return stored
            raise ConflictError(f"job already {stored.status.value}")
        if job.status is JobStatus.QUEUED:
            lane = self._lane_of(job)
            lane.remove(job.id)
            self._publish_positions(lane)
        else:
            context = self._contexts.get(job.id)
            if context is not None:
                ctx, index = context
                ctx.cancel(index)  # the pipeline stops between steps once every job of its batch is cancelled
        self._finalize(job, JobStatus.CANCELLED, error=JobCancelledError(reason))
        return job

    # -- workers -------------------------------------------------------------------------------
    def _halted(self) -> bool:
        """Stopping or draining: no new batch starts (a method, read afresh after every await)."""
        return self._stopping or self.draining

    async def _worker(self, lane: Lane) -> None:
        while not self._halted():
            await lane.wait()
            if self._halted():
                return
            batch = lane.pop_batch(self._max_batch_images)
            if not batch:
                continue
            self._publish_positions(lane)
            lane.busy += 1
            try:
                backend = self.registry.get(batch[0].backend)
                failed = await self._run_batch(backend, batch)
                if failed and len(batch) > 1:
                    # Merging was the service's choice, not the callers': a merged call that fails
                    # (out of memory, one bad prompt) is retried one job at a time, so each job
                    # gets the result it would have had alone.
                    log.info("batch of %d failed; retrying its jobs one by one", len(batch))
                    for job in batch:
                        if not job.final and not self._stopping:
                            await self._run_batch(backend, [job])
            finally:
                lane.busy -= 1

    def _max_batch_images(self, job: Job) -> int:
        return max_images(self.settings, self.registry.get(job.backend))

    async def _run_batch(self, backend: ImageBackend, batch: list[Job]) -> bool:
        """Run one pipeline call for the batch. Returns True when a merged batch failed with an error
        worth retrying job by job (its jobs are then left running, not finalized)."""
        started = time.time()
        for job in batch:
            job.status = JobStatus.RUNNING
            job.started_at = started
            job.attempts += 1
            job.step = 0
            job.total_steps = job.request.denoising_steps or 0
            job.step_clock = None
            job.preview = None
            self.store.update(job)
            self.events.publish(job.id, "running", {"status": "running", "batch_size": len(batch)})
        log.info(
            "batch start backend=%s jobs=%s images=%d",
            backend.id,
            ",".join(job.id for job in batch),
            sum(job.request.num_images for job in batch),
            extra={"job_id": ",".join(job.id for job in batch), "backend": backend.id, "status": "running"},
        )
        ctx = RunContext(
            [job.id for job in batch],
            deadline=time.monotonic() + self.settings.job_timeout,
            on_progress=lambda step, total: self._progress_from_thread(batch, step, total),
            on_preview=lambda step, total, previews: self._preview_from_thread(batch, step, total, previews),
            preview_interval=self.settings.preview_interval,
        )
        for index, job in enumerate(batch):
            self._contexts[job.id] = (ctx, index)
        began = time.monotonic()
        results: list[list[GeneratedImage]] | None = None
        error: ServiceError | None = None
        try:
            results = await asyncio.wait_for(
                backend.generate([job.request for job in batch], ctx), timeout=self.settings.job_timeout
            )
            if len(results) != len(batch):
                raise GenerationFailedError("the backend returned a result per request that does not match")
        except TimeoutError:
            ctx.cancel_all()
            error = DeadlineExceededError(
                f"the job did not finish within {self.settings.job_timeout:g} s (SD_JOB_TIMEOUT)"
            )
        except ServiceError as exc:
            error = exc
        except asyncio.CancelledError:
            ctx.cancel_all()
            self._requeue_interrupted(batch)
            raise
        except Exception:
            log.exception("backend=%s raised an unexpected error", backend.id)
            error = GenerationFailedError("the backend failed unexpectedly; see the service log")
        finally:
            for job in batch:
                self._contexts.pop(job.id, None)
        seconds = time.monotonic() - began
        self._durations.append(seconds)
        if len(batch) > 1 and error is not None and not isinstance(error, (JobCancelledError, DeadlineExceededError)):
            for job in batch:
                job.attempts -= 1  # the retry alone is the same attempt
            return True
        # Encoding and writing images happens off the lane, so the next batch can start now.
        task = asyncio.create_task(self._finish_batch(batch, results, error, seconds))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return False

    def _requeue_interrupted(self, batch: Sequence[Job]) -> None:
        """Shutdown interrupted these jobs: back to queued, the attempt not counted."""
        for job in batch:
            if job.final:
                continue
            job.status = JobStatus.QUEUED
            job.started_at = None
            job.attempts = max(0, job.attempts - 1)
            self.store.update(job)

    async def _finish_batch(
        self,
        batch: list[Job],
        results: list[list[GeneratedImage]] | None,
        error: ServiceError | None,
        seconds: float,
    ) -> None:
        for index, job in enumerate(batch):
            if job.final:
                continue  # cancelled while running: its images are discarded
            if error is not None or results is None:
                self._finalize(job, JobStatus.FAILED, error=error or GenerationFailedError("no result"))
                continue
            try:
                images = await asyncio.to_thread(self._store_images, job, results[index])
            except OSError as exc:
                log.exception("job=%s could not store its images", job.id)
                message = (
                    "no space left in SD_OUTPUT_DIR"
                    if exc.errno == 28
                    else "could not write the image to SD_OUTPUT_DIR"
                )
                self._finalize(job, JobStatus.FAILED, error=GenerationFailedError(message))
                continue
            if job.status.final:  # cancelled while its images were being stored
                continue
            queued_ms = round(((job.started_at or job.created_at) - job.created_at) * 1000, 1)
            timings = Timings(queued_ms=queued_ms, generation_ms=round(seconds * 1000, 1), batch_size=len(batch))
            self._finalize(job, JobStatus.SUCCEEDED, result=JobResult(images=images, timings=timings))

    def _store_images(self, job: Job, images: list[GeneratedImage]) -> list[StoredImage]:
        return store_images(self.outputs, job, images)  # engine/images.py: shared with the workers

    # -- state changes -------------------------------------------------------------------------
    def _finalize(
        self,
        job: Job,
        status: JobStatus,
        *,
        error: ServiceError | None = None,
        result: JobResult | None = None,
    ) -> None:
        job.status = status
        job.finished_at = time.time()
        job.result = result
        job.preview = None  # a preview is of a running job only
        job.error = None if error is None else {**error.to_dict(), "status_code": error.status_code}
        if job.callback_url and self.webhooks is not None:
            # Stored with the final state, in the same write: a crash from here on cannot lose it.
            job.webhook = self.webhooks.pending_state()
        self.store.update(job)
        self._active.pop(job.id, None)
        future = self._done.pop(job.id, None)
        if future is not None and not future.done():
            future.set_result(job)
        self.events.publish(job.id, status.value, {"status": status.value})
        # Timings on the final line: how long the job waited and ran, without a second line per job.
        queued_ms = round(((job.started_at or job.finished_at) - job.created_at) * 1000, 1)
        run_ms = round((job.finished_at - job.started_at) * 1000, 1) if job.started_at else None
        log.info(
            "job=%s %s backend=%s queued=%.1fms run=%sms%s",
            job.id,
            status.value,
            job.backend,
            queued_ms,
            "-" if run_ms is None else f"{run_ms:.1f}",
            f" error={job.error['type']}" if job.error else "",
            extra={
                "job_id": job.id,
                "backend": job.backend,
                "status": status.value,
                "queued_ms": queued_ms,
                "run_ms": run_ms,
                "error_type": job.error["type"] if job.error else None,
                "request_id": job.request_id,
            },
        )
        if self._on_final is not None:
            self._on_final(job)
        if job.callback_url and self.webhooks is not None:
            self.webhooks.schedule(job, self.store)

    def _publish_positions(self, lane: Lane) -> None:
        for position, job in enumerate(lane.jobs()):
            if self.events.listeners(job.id):
                self.events.publish(job.id, "queued", {"status": "queued", "queue_position": position})

    def _progress_from_thread(self, batch: list[Job], step: int, total: int) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_progress, batch, step, total)

    def _on_progress(self, batch: list[Job], step: int, total: int) -> None:
        for job in batch:
            if job.final:
                continue
            job.record_step(step, total)
            self.events.publish(job.id, "progress", job.progress())

    def _preview_from_thread(self, batch: list[Job], step: int, total: int, previews: Sequence[bytes | None]) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_preview, batch, step, total, previews)

    def _on_preview(self, batch: list[Job], step: int, total: int, previews: Sequence[bytes | None]) -> None:
        """Keep each job's latest preview (A1111's current_image, GET .../preview) and send it to its
        event streams; base64 once, whatever the number of listeners."""
        for job, data in zip(batch, previews, strict=False):
            if job.final or data is None:
                continue
            job.preview = Preview(step, total, data, PREVIEW_MIME_TYPE)
            if self.events.listeners(job.id):
                encoded = base64.b64encode(data).decode("ascii")
                self.events.publish(
                    job.id, "preview", {"step": step, "total": total, "mime_type": PREVIEW_MIME_TYPE, "b64": encoded}
                )
