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
from dataclasses import dataclass, field
from typing import Any

from imagegen.backends.base import PREVIEW_MIME_TYPE, ImageBackend, RunContext
from imagegen.backends.registry import BackendRegistry
from imagegen.config import Settings
from imagegen.engine.base import Engine
from imagegen.engine.batching import max_images, select_batch
from imagegen.engine.cost import CostModel
from imagegen.engine.events import JobEvents
from imagegen.engine.images import store_images
from imagegen.engine.jobs import Job, JobStatus, Preview, log_final, new_job_id
from imagegen.engine.results import JobResult, StoredImage, Timings
from imagegen.engine.store import JobStore
from imagegen.errors import (
    BackendNotConfiguredError,
    BackendUnavailableError,
    ConflictError,
    DeadlineExceededError,
    DeadlineUnreachableError,
    GenerationFailedError,
    JobCancelledError,
    NotFoundError,
    QueueFullError,
    QueueTimeoutError,
    ServiceDrainingError,
    ServiceError,
)
from imagegen.generation import GeneratedImage, GenerationParams, GenerationRequest
from imagegen.storage.outputs import OutputStore

log = logging.getLogger("imagegen.engine")

#: The jobs of one backend call (`list` is JobEngine.list inside the class: these aliases name the builtin).
Batch = list[Job]
#: A backend call's images: one list per request, in the order of the batch.
BatchImages = list[list[GeneratedImage]]
StoredImages = list[StoredImage]

#: After the shutdown grace, how long a batch that was told to end at once may take to return
#: (a device process is killed at once; a backend running in a thread of this process may never return).
SHUTDOWN_STOP_WAIT = 5.0


class Lane:
    """A priority queue of jobs (highest priority first, then first come) and its workers."""

    def __init__(self, name: str, concurrency: int) -> None:
        self.name = name
        self.concurrency = max(1, concurrency)
        self._queue: list[tuple[int, int, Job]] = []  # (-priority, seq, job), kept sorted
        self._wakeup = asyncio.Event()
        self.workers: list[asyncio.Task[None]] = []
        self.busy = 0
        #: the batches taken off this queue and not finished yet (what /health shows of the lane)
        self.runs: list[_Run] = []

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

    def peek(self) -> Job | None:
        return self._queue[0][2] if self._queue else None

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


@dataclass(eq=False)
class _Run:
    """A batch taken off its lane's queue, until its backend call has returned (the device is free)."""

    lane: Lane
    backend: ImageBackend
    batch: list[Job]
    ctx: RunContext
    task: asyncio.Task[list[list[GeneratedImage]]] | None = None
    taken_at: float = field(default_factory=time.monotonic)
    #: when the backend said the batch had the device (monotonic; wall clock in the jobs' started_at)
    started_at: float | None = None
    deadline: float | None = None
    overrun_at: float | None = None
    stop_reason: str | None = None
    stop_requested_at: float | None = None
    #: the shutdown took its jobs back to the queue (for the next start): their results are discarded
    interrupted: bool = False
    timer: asyncio.TimerHandle | None = None
    #: (step, monotonic time) of the first and last progress reports, for the cost model
    first_step: tuple[int, float] | None = None
    last_step: tuple[int, float] | None = None

    @property
    def done(self) -> bool:
        return self.task is not None and self.task.done()

    @property
    def overrun(self) -> bool:
        """Past its deadline while its backend call has not returned: the device is not free (unless
        the batch released it and is only finishing)."""
        return self.overrun_at is not None and not self.done and not self.ctx.released

    def describe(self, now: float) -> dict[str, Any]:
        if self.interrupted:
            state = "interrupted"
        elif self.overrun_at is not None:
            state = "overrun"
        elif self.stop_reason is not None:
            state = "stopping"
        elif self.ctx.released:
            state = "finishing"  # off the device: the next batch may run meanwhile
        elif self.started_at is not None:
            state = "running"
        else:
            state = "waiting"
        since = self.started_at if self.started_at is not None else self.taken_at
        return {
            "backend": self.backend.id,
            "jobs": [job.id for job in self.batch],
            "state": state,
            "since": _iso(time.time() - (now - since)),
            "seconds": round(now - since, 1),
            "deadline_in_seconds": None if self.deadline is None else round(self.deadline - now, 1),
            "deadline_passed": self.deadline is not None and now > self.deadline,
            "stop_reason": self.stop_reason,
        }


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


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
        #: job id -> the batch it was taken off the queue in, and its index there
        self._runs: dict[str, tuple[_Run, int]] = {}
        #: job id -> the timer that fails it after SD_QUEUE_TIMEOUT in the queue
        self._queue_timers: dict[str, asyncio.TimerHandle] = {}
        self._seq = itertools.count()
        self._durations: deque[float] = deque(maxlen=32)
        #: step times measured on this device, for admission and batching (engine/cost.py)
        self.costs = CostModel()
        self._background: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.draining = False
        self._drain_started: float | None = None
        self._grace_timer: asyncio.TimerHandle | None = None

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
        """Stop admitting new jobs (503) and starting queued ones; running batches go on for
        SD_SHUTDOWN_GRACE seconds from now, then are interrupted and their jobs requeued.

        Queued jobs stay queued in the store for the next start; a synchronous caller waiting on
        one is answered 503 now rather than when the connection is dropped. Safe to call from a
        signal handler on the loop's thread (the grace timer is set from the loop)."""
        if self.draining:
            return
        log.info("draining: new jobs are refused; queued jobs stay in the store for the next start")
        self.draining = True
        self._drain_started = time.monotonic()
        for lane in self._lanes.values():
            for job in lane.jobs():
                self._release_waiter(job.id)
            lane.wake()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._arm_grace_timer, self.settings.shutdown_grace)

    def _arm_grace_timer(self, grace: float) -> None:
        if self._grace_timer is None and self._loop is not None:
            self._grace_timer = self._loop.call_later(grace, self._interrupt_running)

    async def shutdown(self, grace: float) -> None:
        """Let running batches finish within `grace` seconds of the start of the drain, then end
        them (a device process is killed) and requeue their jobs; queued jobs stay queued in the store.

        Bounded whatever a backend does: SIGTERM ends within SD_SHUTDOWN_GRACE plus SHUTDOWN_STOP_WAIT."""
        self.begin_drain()
        self._stopping = True
        assert self._drain_started is not None
        remaining = max(0.0, self._drain_started + grace - time.monotonic())
        workers = [task for lane in self._lanes.values() for task in lane.workers]
        for lane in self._lanes.values():
            lane.wake()
        if workers:
            _, pending = await asyncio.wait(workers, timeout=remaining)
            if pending:
                self._interrupt_running()
                _, pending = await asyncio.wait(pending, timeout=SHUTDOWN_STOP_WAIT)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=SHUTDOWN_STOP_WAIT)
        if self._grace_timer is not None:
            self._grace_timer.cancel()
        if self._background:
            await asyncio.wait(self._background, timeout=max(1.0, min(grace, 10.0)))
        for job_id in list(self._done):
            self._release_waiter(job_id)

    def _interrupt_running(self) -> None:
        """The shutdown grace is over: every batch still on a backend ends now (a device process is
        killed at once), and its unfinished jobs go back to the queue for the next start, without
        counting the attempt (as after a crash)."""
        for lane in self._lanes.values():
            for run in list(lane.runs):
                if run.interrupted or run.done or run.ctx.released:
                    continue  # a batch that released the device only finishes its images: let it
                run.interrupted = True
                jobs = [job for job in run.batch if not job.final]
                self._requeue_interrupted(run, jobs)
                for job in jobs:
                    self._release_waiter(job.id)
                log.warning(
                    "shutdown: batch of job(s) %s ended after SD_SHUTDOWN_GRACE; requeued for the next start",
                    ",".join(job.id for job in jobs) or "-",
                )
                self._stop_run(run, "shutdown", urgent=True)

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
        if backend.runs_on_device:
            self._check_cost(request)
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

    def _check_cost(self, request: GenerationRequest) -> None:
        """Refuse a request that could not finish within SD_JOB_TIMEOUT on this device (engine/cost.py)."""
        estimate = self.costs.estimate(request)
        timeout = self.settings.job_timeout
        if estimate is None or estimate.seconds <= timeout:
            return
        raise DeadlineUnreachableError(
            f"this request needs at least {estimate.seconds:.0f} s on this device, more than SD_JOB_TIMEOUT "
            f"({timeout:g} s): {request.width}x{request.height} px x {request.num_images} image(s) x "
            f"{request.denoising_steps} steps at {estimate.rate * 1e6:.3g} s per megapixel-step of denoising, the "
            f"fastest measured here for {request.backend}/{request.model}; lower width and height, steps or num_images"
        )

    def _enqueue(self, job: Job) -> None:
        assert self._loop is not None, "engine not started"
        lane = self._lane_of(job)
        self._active[job.id] = job
        self._done[job.id] = self._loop.create_future()
        lane.push(job, next(self._seq))
        if self.settings.queue_timeout > 0:
            self._queue_timers[job.id] = self._loop.call_later(self.settings.queue_timeout, self._queue_expired, job.id)
        self.events.publish(job.id, "queued", {"status": "queued", "queue_position": lane.position(job.id)})

    def _lane_of(self, job: Job) -> Lane:
        return self._lanes[self.registry.get(job.backend).lane]

    def queued_count(self) -> int:
        """Jobs waiting for a device: in the queues, or taken off in a batch that has not started."""
        waiting = sum(
            1 for run, _ in self._runs.values() if run.started_at is None and not run.interrupted and not run.done
        )
        return sum(len(lane) for lane in self._lanes.values()) + waiting

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
        now = time.monotonic()
        return {
            "queued": self.queued_count(),
            "running": self.running_count(),
            "max_queue": self.settings.max_queue,
            "draining": self.draining,
            "lanes": {
                name: {
                    "queued": len(lane),
                    "busy": lane.busy,
                    "concurrency": lane.concurrency,
                    "batches": [run.describe(now) for run in lane.runs],
                }
                for name, lane in self._lanes.items()
            },
        }

    def lane_activity(self, lane_name: str) -> list[dict[str, Any]]:
        """The batches on a lane's backends now: jobs, since when, deadline, overrun, stopping."""
        lane = self._lanes.get(lane_name)
        now = time.monotonic()
        return [] if lane is None else [run.describe(now) for run in lane.runs]

    def overrun(self, lane_name: str) -> bool:
        """A batch of this lane is past its deadline and its backend has not returned yet: the device
        is not free (readiness says so until it is)."""
        lane = self._lanes.get(lane_name)
        return lane is not None and any(run.overrun for run in lane.runs)

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
        if job.id in self._runs:
            return 0  # taken off the queue in the next batch: waiting for the device
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
        self._end_early(job, JobStatus.CANCELLED, JobCancelledError(reason), reason)
        return job

    def _end_early(self, job: Job, status: JobStatus, error: ServiceError, stop_reason: str) -> None:
        """Finalize a job before its batch ends (cancel, queue timeout). A batch whose jobs have all
        ended is stopped: the device is free again only once its backend has returned."""
        entry = self._runs.get(job.id)
        if entry is None:
            lane = self._lane_of(job)
            if lane.remove(job.id):
                self._publish_positions(lane)
            self._finalize(job, status, error=error)
            return
        run, index = entry
        run.ctx.cancel(index)  # a local pipeline stops between steps once every job of its batch is cancelled
        self._finalize(job, status, error=error)
        if all(other.final for other in run.batch):
            self._stop_run(run, stop_reason)

    def _queue_expired(self, job_id: str) -> None:
        self._queue_timers.pop(job_id, None)
        job = self._active.get(job_id)
        if job is None or job.status is not JobStatus.QUEUED or self.draining:
            return
        timeout = self.settings.queue_timeout
        error = QueueTimeoutError(
            f"the job waited {timeout:g} s in the queue without getting the device (SD_QUEUE_TIMEOUT); retry later",
            retry_after=self.retry_after(),
        )
        self._end_early(job, JobStatus.FAILED, error, "queue timeout")

    def _stop_run(self, run: _Run, reason: str, *, urgent: bool = False) -> None:
        """End a batch's backend call early: cancel its task (a backend holding a device returns
        only once the device is free; see `ImageBackend.reports_start`)."""
        if run.stop_reason is None:
            run.stop_reason = reason
            run.stop_requested_at = time.monotonic()
        run.ctx.stop_reason = run.stop_reason
        if urgent:
            run.ctx.urgent = True
        run.ctx.cancel_all()
        if run.task is not None and not run.task.done():
            run.task.cancel()

    # -- workers -------------------------------------------------------------------------------
    def _halted(self) -> bool:
        """Stopping or draining: no new batch starts (a method, read afresh after every await)."""
        return self._stopping or self.draining

    async def _worker(self, lane: Lane) -> None:
        """Take batches off the lane one at a time. A batch whose backend releases the device before its
        call ends (RunContext.release_device: a local backend finishing its images off the device thread)
        lets the next batch start while it finishes; at most one batch finishes while another runs."""
        finishing: asyncio.Task[None] | None = None  # the previous batch, off the device, still finishing
        flow: asyncio.Task[None] | None = None
        try:
            while not self._halted():
                await lane.wait()
                if self._halted():
                    break
                head = lane.peek()
                if head is None:
                    continue
                # A device that is coming back (a device process restarting) keeps the jobs at their
                # queue positions rather than in a batch that cannot start.
                await self.registry.get(head.backend).until_available()
                if self._stopping or self.draining:
                    break
                batch = lane.pop_batch(self._max_batch_images)
                if not batch:
                    continue
                self._publish_positions(lane)
                released = asyncio.Event()
                flow = asyncio.create_task(self._run_jobs(lane, batch, released), name=f"jobs-{batch[0].id}")
                waiter = asyncio.ensure_future(released.wait())
                try:
                    await asyncio.wait({flow, waiter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if finishing is not None:
                    await asyncio.wait({finishing})  # never a second batch finishing while one runs
                    finishing.result()
                finishing, flow = (None, flow) if flow.done() else (flow, None)
                if flow is not None:
                    flow.result()
                    flow = None
        except asyncio.CancelledError:
            # The worker itself is cancelled (a shutdown past its grace): its batches end now.
            pending = {task for task in (flow, finishing) if task is not None and not task.done()}
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=SHUTDOWN_STOP_WAIT + 1)
            raise
        if finishing is not None:
            await asyncio.wait({finishing})  # the worker ends once its last batch has finished

    async def _run_jobs(self, lane: Lane, batch: Batch, released: asyncio.Event) -> None:
        """One batch taken off the lane, and when a merged batch fails before its device was released,
        its jobs one by one."""
        lane.busy += 1
        try:
            backend = self.registry.get(batch[0].backend)
            failed = await self._run_batch(lane, backend, batch, released)
            if failed and len(batch) > 1:
                # Merging was the service's choice, not the callers': a merged call that fails
                # (out of memory, one bad prompt) is retried one job at a time, so each job
                # gets the result it would have had alone.
                log.info("batch of %d failed; retrying its jobs one by one", len(batch))
                for job in batch:
                    if not job.final and not (self._stopping or self.draining):
                        await self._run_batch(lane, backend, [job])
        finally:
            lane.busy -= 1

    def _max_batch_images(self, job: Job) -> int:
        backend = self.registry.get(job.backend)
        limit = max_images(self.settings, backend)
        if backend.runs_on_device:
            # No more images in one call than fit in the deadline on this device.
            fitting = self.costs.images_within(job.request, self.settings.job_timeout)
            if fitting is not None:
                limit = max(job.request.num_images, min(limit, fitting))
        return limit

    async def _run_batch(
        self, lane: Lane, backend: ImageBackend, batch: Batch, released: asyncio.Event | None = None
    ) -> bool:
        """Run one backend call for the batch. Returns True when a merged batch failed with an error
        worth retrying job by job (its jobs are then back in the queued state, not finalized).

        The jobs stay `queued` until the backend says the batch has the device; their deadline
        (SD_JOB_TIMEOUT) counts from then. A batch past its deadline, or whose jobs have all been
        cancelled, is stopped: its jobs are answered at once, and the lane takes the next batch
        only when the backend has returned (the device is free) or has released the device
        (`released` is set then: the caller may start the next batch while this one finishes)."""
        loop = asyncio.get_running_loop()
        started = asyncio.Event()
        timeout = self.settings.job_timeout

        def on_started() -> None:  # any thread: the device thread, the loop
            ctx.deadline = time.monotonic() + timeout
            loop.call_soon_threadsafe(started.set)

        def on_released() -> None:  # any thread: the device thread, the loop
            if released is not None:
                loop.call_soon_threadsafe(released.set)

        ctx = RunContext(
            [job.id for job in batch],
            on_progress=lambda step, total: self._progress_from_thread(run, step, total),
            on_started=on_started,
            on_preview=lambda step, total, previews: self._preview_from_thread(batch, step, total, previews),
            preview_interval=self.settings.preview_interval,
            on_released=on_released,
        )
        run = _Run(lane, backend, batch, ctx)
        lane.runs.append(run)
        for index, job in enumerate(batch):
            self._runs[job.id] = (run, index)
            if job.final:  # ended (cancel, queue timeout) between leaving the queue and this run's start
                ctx.cancel(index)
        if not backend.reports_start:
            ctx.mark_started()  # before the call: a backend reads ctx.deadline as it begins
        task = asyncio.create_task(backend.generate([job.request for job in batch], ctx), name=f"batch-{batch[0].id}")
        run.task = task
        try:
            waiter = asyncio.ensure_future(started.wait())
            try:
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if ctx.started and not run.interrupted:
                self._mark_running(run)
            await asyncio.wait({task})
        except asyncio.CancelledError:
            # The worker itself is cancelled (a shutdown past its grace): end the call now.
            if not run.interrupted:
                run.interrupted = True
                self._requeue_interrupted(run, [job for job in batch if not job.final])
            self._stop_run(run, "shutdown", urgent=True)
            await asyncio.wait({task}, timeout=SHUTDOWN_STOP_WAIT)
            raise
        finally:
            if run.timer is not None:
                run.timer.cancel()
            lane.runs.remove(run)
            for job in batch:
                if self._runs.get(job.id, (None,))[0] is run:
                    del self._runs[job.id]
        if run.interrupted:
            return False  # its jobs are queued again, for the next start
        results: BatchImages | None = None
        error: ServiceError | None = None
        if task.cancelled():
            error = JobCancelledError(f"stopped ({run.stop_reason or 'cancelled'})")
        elif isinstance(task.exception(), ServiceError):
            error = task.exception()  # type: ignore[assignment]
        elif task.exception() is not None:
            log.error("backend=%s raised an unexpected error", backend.id, exc_info=task.exception())
            error = GenerationFailedError("the backend failed unexpectedly; see the service log")
        else:
            results = task.result()
            if len(results) != len(batch):
                error = GenerationFailedError("the backend returned a result per request that does not match")
                results = None
        seconds = time.monotonic() - (run.started_at if run.started_at is not None else run.taken_at)
        if run.started_at is not None:
            self._durations.append(seconds)
        if (
            len(batch) > 1
            and error is not None
            and run.stop_reason is None
            and not ctx.released  # the lane has moved on: the next batch has the device
            and not isinstance(error, (JobCancelledError, DeadlineExceededError))
        ):
            for job in batch:
                if job.final:
                    continue
                if run.started_at is not None:
                    job.attempts -= 1  # the retry alone is the same attempt
                job.status = JobStatus.QUEUED
                job.started_at = None
                self.store.update(job)
            return True
        if results is not None:
            self._observe_cost(run)
        # Encoding and writing images happens off the lane, so the next batch can start now.
        finish = asyncio.create_task(self._finish_batch(batch, results, error, seconds))
        self._background.add(finish)
        finish.add_done_callback(self._background.discard)
        return False

    def _mark_running(self, run: _Run) -> None:
        """The batch has the device: its jobs are running, and its deadline counts from now."""
        assert self._loop is not None
        now = time.time()
        run.started_at = time.monotonic()
        run.deadline = (
            run.ctx.deadline if math.isfinite(run.ctx.deadline) else run.started_at + self.settings.job_timeout
        )
        for job in run.batch:
            timer = self._queue_timers.pop(job.id, None)
            if timer is not None:
                timer.cancel()
            if job.final:
                continue
            job.status = JobStatus.RUNNING
            job.started_at = now
            job.attempts += 1
            job.step = 0
            job.total_steps = job.request.denoising_steps or 0
            job.step_clock = None
            job.preview = None
            self.store.update(job)
            self.events.publish(job.id, "running", {"status": "running", "batch_size": len(run.batch)})
        log.info(
            "batch start backend=%s jobs=%s images=%d",
            run.backend.id,
            ",".join(job.id for job in run.batch),
            sum(job.request.num_images for job in run.batch),
            extra={"job_id": ",".join(job.id for job in run.batch), "backend": run.backend.id, "status": "running"},
        )
        if not run.done:
            run.timer = self._loop.call_later(max(0.0, run.deadline - time.monotonic()), self._expire, run)

    def _expire(self, run: _Run) -> None:
        """The batch's deadline has passed: its jobs fail now (504), whatever the backend does later
        is discarded, and the backend is told to stop (a device process that does not stop within
        SD_DEVICE_STOP_GRACE is killed and restarted)."""
        if run.done or run.interrupted:
            return
        run.overrun_at = time.monotonic()
        timeout = self.settings.job_timeout
        error = DeadlineExceededError(
            f"the job did not finish within {timeout:g} s of getting the device (SD_JOB_TIMEOUT)"
        )
        for job in run.batch:
            if not job.final:
                self._finalize(job, JobStatus.FAILED, error=error)
        log.warning(
            "batch of job(s) %s on backend=%s overran its deadline (SD_JOB_TIMEOUT=%g s); stopping it",
            ",".join(job.id for job in run.batch),
            run.backend.id,
            timeout,
        )
        self._stop_run(run, "deadline exceeded")

    def _requeue_interrupted(self, run: _Run, jobs: Sequence[Job]) -> None:
        """Shutdown interrupted these jobs: back to queued, the attempt not counted."""
        for job in jobs:
            if job.final:
                continue
            if job.status is JobStatus.RUNNING:
                job.attempts = max(0, job.attempts - 1)
            job.status = JobStatus.QUEUED
            job.started_at = None
            self.store.update(job)

    def _observe_cost(self, run: _Run) -> None:
        if not run.backend.runs_on_device or run.first_step is None or run.last_step is None:
            return
        steps = run.last_step[0] - run.first_step[0]
        request = run.batch[0].request
        pixel_images = request.width * request.height * sum(job.request.num_images for job in run.batch)
        self.costs.observe(request.backend, request.model, pixel_images, steps, run.last_step[1] - run.first_step[1])

    async def _finish_batch(
        self,
        batch: Batch,
        results: BatchImages | None,
        error: ServiceError | None,
        seconds: float,
    ) -> None:
        for index, job in enumerate(batch):
            if job.final:
                continue  # cancelled or past its deadline while running: its images are discarded
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
        timer = self._queue_timers.pop(job.id, None)
        if timer is not None:
            timer.cancel()
        job.status = status
        job.finished_at = time.time()
        job.result = result
        job.preview = None  # a preview is of a running job only
        job.error = None
        if error is not None:
            job.error = {**error.to_dict(), "status_code": error.status_code}
            if "Retry-After" in error.headers:
                job.error["retry_after"] = int(error.headers["Retry-After"])
        if job.callback_url and self.webhooks is not None:
            # Stored with the final state, in the same write: a crash from here on cannot lose it.
            job.webhook = self.webhooks.pending_state()
        self.store.update(job)
        self._active.pop(job.id, None)
        future = self._done.pop(job.id, None)
        if future is not None and not future.done():
            future.set_result(job)
        self.events.publish(job.id, status.value, {"status": status.value})
        log_final(log, job, status, job.finished_at, job.error["type"] if job.error else None)
        if self._on_final is not None:
            self._on_final(job)
        if job.callback_url and self.webhooks is not None:
            self.webhooks.schedule(job, self.store)

    def _publish_positions(self, lane: Lane) -> None:
        for position, job in enumerate(lane.jobs()):
            if self.events.listeners(job.id):
                self.events.publish(job.id, "queued", {"status": "queued", "queue_position": position})

    def _progress_from_thread(self, run: _Run, step: int, total: int) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_progress, run, step, total, time.monotonic())

    def _on_progress(self, run: _Run, step: int, total: int, at: float) -> None:
        if run.first_step is None:
            run.first_step = (step, at)
        run.last_step = (step, at)
        for job in run.batch:
            if job.final or job.status is not JobStatus.RUNNING:
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
            if job.final or data is None or job.status is not JobStatus.RUNNING:
                continue
            job.preview = Preview(step, total, data, PREVIEW_MIME_TYPE)
            if self.events.listeners(job.id):
                encoded = base64.b64encode(data).decode("ascii")
                self.events.publish(
                    job.id, "preview", {"step": step, "total": total, "mime_type": PREVIEW_MIME_TYPE, "b64": encoded}
                )
