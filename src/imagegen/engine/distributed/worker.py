"""The worker of a cluster (`imagegen worker`, docs/scale-out.md): loads its models, leases jobs of the
routes it serves, runs them on its backends, publishes every step, stores the images, finalizes.

Lanes and batching work as in the embedded engine (engine/engine.py): the backends of one lane share
its slots (local backends one device slot; flux-api SD_BFL_MAX_ACTIVE_TASKS), and a batch is chosen
with the same function (engine/batching.py `select_batch`) from the queues of the lane's routes read
in rank order; the images are stored with the same function (engine/images.py `store_images`). The
backends are used only through `ImageBackend`, as the registry (`BackendRegistry.from_settings`)
builds them.

A claimed job is a stream entry in this worker's pending list: its lease, renewed by every step and
every heartbeat. A job that is no longer this run's (cancelled, finished or taken over elsewhere, as
the `progress` script or a lost renewal says) is cancelled in its RunContext and never finalized here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagegen.backends.base import ImageBackend, RunContext
from imagegen.backends.registry import BackendRegistry
from imagegen.config import Settings
from imagegen.engine.batching import max_images, select_batch
from imagegen.engine.distributed.codec import job_from_fields
from imagegen.engine.distributed.connection import connect, describe, is_unreachable
from imagegen.engine.distributed.engine import node_name
from imagegen.engine.distributed.keys import GROUP, Keys, route_of, split_route
from imagegen.engine.distributed.scripts import Scripts
from imagegen.engine.distributed.upkeep import Upkeep, job_ttl_ms
from imagegen.engine.images import remove_images, store_images
from imagegen.engine.jobs import Job, JobStatus, log_final
from imagegen.engine.results import JobResult, Timings
from imagegen.errors import (
    DeadlineExceededError,
    GenerationFailedError,
    JobCancelledError,
    ServiceError,
)
from imagegen.generation import GeneratedImage, GenerationRequest
from imagegen.storage.outputs import OutputStore
from imagegen.storage.shared import output_sharing

#: After a stop past the grace, how long a call told to end at once may take to return (a device
#: process is killed at once; a backend in a thread of this process may never return).
SHUTDOWN_STOP_WAIT = 5.0

log = logging.getLogger("imagegen.worker")

#: Seconds an idle slot waits for a wake-up before it looks at its queues anyway.
IDLE_POLL = 1.0
#: Jobs looked at per route when choosing a batch (the embedded engine looks at its whole lane).
PEEK = 1000
PROBE_PREFIX = ".imagegen-probe-"


def heartbeat_interval(lease: float) -> float:
    return min(5.0, lease / 3)


@dataclass
class WorkerLane:
    """The slots a lane's backends share on this worker, and the routes it reads."""

    name: str
    concurrency: int
    routes: list[str] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: One claim at a time per lane on this worker: its slots would only race each other for the head.
    claiming: asyncio.Lock = field(default_factory=asyncio.Lock)
    busy: int = 0
    slots: list[asyncio.Task[None]] = field(default_factory=list)


class Worker:
    def __init__(
        self,
        settings: Settings,
        registry: BackendRegistry,
        outputs: OutputStore,
        *,
        models: Mapping[str, Sequence[str]] | None = None,
        name: str | None = None,
    ) -> None:
        """`registry` holds exactly the backends served; `models` narrows a backend to some of its models."""
        self.settings = settings
        self.registry = registry
        self.outputs = outputs
        self.name = name or node_name("worker")
        self.keys = Keys.for_prefix(settings.redis_prefix)
        self.conn = connect(settings, self.name)
        self.scripts = Scripts(self.conn, self.keys)
        self.upkeep = Upkeep(settings, self.conn, self.keys, self.scripts, self.name)
        self.models: dict[str, tuple[str, ...]] = {}
        for backend in registry:
            offered = backend.capabilities().models
            wanted = tuple((models or {}).get(backend.id) or offered)
            unknown = [model for model in wanted if model not in offered]
            if unknown:
                raise ValueError(f"backend '{backend.id}' does not offer model(s) {', '.join(unknown)}")
            self.models[backend.id] = wanted
        self.lanes: dict[str, WorkerLane] = {}
        for backend in registry:
            lane = self.lanes.get(backend.lane)
            if lane is None:
                lane = self.lanes[backend.lane] = WorkerLane(backend.lane, backend.concurrency)
            lane.concurrency = max(lane.concurrency, backend.concurrency)
            lane.routes.extend(route_of(backend.id, model) for model in self.models[backend.id])
        self.probe = PROBE_PREFIX + self.name
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._finishing: set[asyncio.Task[None]] = set()
        #: job id -> (its batch's RunContext, its index there), while its batch runs
        self._contexts: dict[str, tuple[RunContext, int]] = {}
        #: job id -> the run token of a job this worker holds (its lease is renewed until it is final)
        self._held: dict[str, str] = {}
        #: jobs that are no longer this worker's run (cancelled, finished or taken over elsewhere)
        self._lost: set[str] = set()
        self._requests: OrderedDict[str, tuple[GenerationRequest, int]] = OrderedDict()
        self._durations: deque[float] = deque(maxlen=32)
        self._started = time.time()
        self._give_up_at: float | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the backends (the first one begins loading its model), then the loops."""
        log.info(
            "worker %s: backends %s, jobs from Redis at %s",
            self.name,
            ", ".join(f"{backend_id} ({', '.join(models)})" for backend_id, models in self.models.items()),
            describe(self.settings),
        )
        sharing = output_sharing(self.outputs.root)
        (log.warning if sharing.shared is False else log.info)("%s", sharing.message(self.outputs.root))
        await asyncio.to_thread(self._write_probe)
        await self.registry.start()
        try:
            await self.scripts.ensure_group()
            await self._heartbeat()
        except Exception as error:
            if not is_unreachable(error):
                raise
            log.error("START-UP: Redis at %s is unreachable; waiting for it", describe(self.settings))
        for loop in (self._heartbeat_loop(), self._control_loop(), self.upkeep.run(self._stop)):
            self._spawn(loop)
        for lane in self.lanes.values():
            for index in range(lane.concurrency):
                slot = asyncio.create_task(self._slot(lane), name=f"slot-{lane.name}-{index}")
                lane.slots.append(slot)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def request_stop(self) -> None:
        """Stop claiming (SIGTERM); callable from a signal handler."""
        if not self._stop.is_set():
            log.info("worker %s stopping: no new jobs; running batches get SD_SHUTDOWN_GRACE", self.name)
        self._stop.set()
        for lane in self.lanes.values():
            lane.wake.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def close(self, grace: float | None = None) -> None:
        """Let running batches finish within `grace` (SD_SHUTDOWN_GRACE), give back the rest (not
        counted as an attempt), leave the live workers, release the backends."""
        grace = self.settings.shutdown_grace if grace is None else grace
        self.request_stop()
        self._give_up_at = time.monotonic() + max(grace, 1.0)
        slots = [slot for lane in self.lanes.values() for slot in lane.slots]
        if slots:
            _, pending = await asyncio.wait(slots, timeout=grace)
            for slot in pending:
                slot.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._finishing:
            _, unfinished = await asyncio.wait(self._finishing, timeout=max(1.0, min(grace, 10.0)))
            for task in unfinished:  # Redis away too long: those jobs run again after their lease
                task.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        with contextlib.suppress(Exception):  # unreachable Redis: the heartbeat ages out by itself
            # Not live from now on, but remembered for a while: a worker being restarted keeps its
            # routes open (jobs wait for it) instead of having them refused.
            seconds, micros = await self.conn.time()
            stopped = float(seconds) + float(micros) / 1e6 - self.settings.worker_lease_seconds - 1
            await self.conn.zadd(self.keys.workers_seen, {self.name: stopped})
        await asyncio.to_thread(self._remove_probe)
        await self.registry.close()
        await self.conn.aclose()
        log.info("worker %s stopped", self.name)

    # -- the output folder probe ---------------------------------------------------------------
    def _write_probe(self) -> None:
        """A file the replicas look for in their SD_OUTPUT_DIR: seen there means the folder is shared."""
        root = Path(self.outputs.root)
        cutoff = time.time() - 86_400
        with contextlib.suppress(OSError):
            for old in root.glob(PROBE_PREFIX + "*"):  # left by workers that were killed
                with contextlib.suppress(OSError):
                    if old.stat().st_mtime < cutoff:
                        old.unlink()
        try:
            (root / self.probe).write_text(f"imagegen worker {self.name} on {socket.gethostname()}\n")
        except OSError as error:
            log.warning("could not write the output probe file into SD_OUTPUT_DIR: %s", error.strerror)

    def _remove_probe(self) -> None:
        with contextlib.suppress(OSError):
            (Path(self.outputs.root) / self.probe).unlink()

    # -- heartbeat and leases ------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        backends: dict[str, Any] = {}
        for backend in self.registry:
            health = backend.health()
            backends[backend.id] = {
                "state": health.state.value,
                "reason": health.reason,
                "model": health.model,
                "device": health.device,
                "dtype": health.dtype,
                "loaded": health.loaded,
                "models": list(self.models[backend.id]),
            }
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self._started,
            "backends": backends,
            "lanes": {lane.name: {"busy": lane.busy, "concurrency": lane.concurrency} for lane in self.lanes.values()},
            "running": sorted(self._held),
            "probe": self.probe,
            "batch_seconds": round(sum(self._durations) / len(self._durations), 3) if self._durations else None,
        }

    async def _heartbeat(self) -> None:
        await self.scripts.heartbeat(self.name, self.report())
        held = dict(self._held)
        if not held:
            return
        renewed = set(
            await self.conn.xclaim(
                self.keys.runs, GROUP, self.name, min_idle_time=0, message_ids=list(held.values()), justid=True
            )
        )
        for job_id, token in held.items():
            if token not in renewed and job_id in self._held:
                self._lose(job_id, "its lease was taken over (this worker did not renew it in time)")

    async def _heartbeat_loop(self) -> None:
        interval = heartbeat_interval(self.settings.worker_lease_seconds)
        quiet = False
        while True:
            try:
                await self._heartbeat()
                if quiet:
                    log.info("Redis at %s answers again", describe(self.settings))
                quiet = False
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if not is_unreachable(error):
                    log.exception("heartbeat failed")
                elif not quiet:
                    log.warning(
                        "Redis at %s is unreachable (%s); retrying", describe(self.settings), type(error).__name__
                    )
                quiet = True
            await asyncio.sleep(interval)

    def _lose(self, job_id: str, why: str) -> None:
        """The job is no longer this run's: stop it at the next step, never finalize it here."""
        if job_id in self._lost:
            return
        self._lost.add(job_id)
        log.info("job=%s stops on this worker: %s", job_id, why)
        context = self._contexts.get(job_id)
        if context is not None:
            ctx, index = context
            ctx.cancel(index)

    # -- cancel and wake-ups from the cluster --------------------------------------------------
    async def _control_loop(self) -> None:
        backoff = 0.2
        while True:
            pubsub = self.conn.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.keys.control, self.keys.wake)
                for lane in self.lanes.values():
                    lane.wake.set()  # something may have been queued while not subscribed
                backoff = 0.2
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._on_control(str(message["channel"]), str(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if not is_unreachable(error):
                    log.exception("control subscription failed; subscribing again")
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _on_control(self, channel: str, data: str) -> None:
        if channel == self.keys.wake:
            for lane in self.lanes.values():
                if data in lane.routes:
                    lane.wake.set()
            return
        try:
            job_id = str(json.loads(data)["cancel"])
        except (ValueError, KeyError, TypeError):
            return
        if job_id in self._contexts:
            self._lose(job_id, "cancelled or finished elsewhere")

    # -- claiming ------------------------------------------------------------------------------
    async def _slot(self, lane: WorkerLane) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            lane.wake.clear()
            try:
                async with lane.claiming:
                    batch, empty = await self._claim(lane)
                backoff = 0.2
            except Exception as error:
                if not is_unreachable(error):
                    log.exception("claiming failed")
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                continue
            if not batch:
                if empty:  # otherwise other workers were faster: look again at once
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lane.wake.wait(), timeout=IDLE_POLL)
                continue
            lane.busy += 1
            try:
                await self._run_batch(batch)
            finally:
                lane.busy -= 1

    async def _peek(self, lane: WorkerLane) -> list[Job]:
        """The queued jobs of the lane's routes in queue order (rank: priority, then admission). A
        backend that cannot take jobs here (not configured on this machine) leaves its routes to others."""
        routes = [
            route for route in lane.routes if self.registry.get(split_route(route)[0]).availability().accepts_jobs
        ]
        async with self.conn.pipeline(transaction=False) as pipe:
            for route in routes:
                pipe.zrange(self.keys.queue(route), 0, PEEK - 1, withscores=True)
            per_route = await pipe.execute()
        ranked = sorted((float(score), str(job_id)) for entries in per_route for job_id, score in entries)[:PEEK]
        unknown = [job_id for _, job_id in ranked if job_id not in self._requests]
        if unknown:
            async with self.conn.pipeline(transaction=False) as pipe:
                for job_id in unknown:
                    pipe.hmget(self.keys.job(job_id), ["request", "priority"])
                rows = await pipe.execute()
            for job_id, (request, priority) in zip(unknown, rows, strict=True):
                if request:  # a job is immutable: its request is kept until the cache is full
                    self._requests[job_id] = (GenerationRequest.model_validate_json(request), int(priority or 0))
            while len(self._requests) > 4 * PEEK:
                self._requests.popitem(last=False)
        return [
            Job(id=job_id, request=self._requests[job_id][0], priority=self._requests[job_id][1])
            for _, job_id in ranked
            if job_id in self._requests
        ]

    def _max_batch_images(self, job: Job) -> int:
        return max_images(self.settings, self.registry.get(job.backend))

    async def _claim(self, lane: WorkerLane) -> tuple[list[tuple[Job, str]], bool]:
        """Choose a batch as the embedded engine does and claim it: (the batch, whether the lane's
        queues were empty); ([], False) when other workers kept taking the chosen heads."""
        for _ in range(10):  # another worker may be faster: choose again
            queue = await self._peek(lane)
            chosen = select_batch(queue, self._max_batch_images)
            if not chosen:
                return [], True
            claimed = await self.scripts.claim(self.name, time.time(), [queue[index].id for index in chosen])
            if not claimed:
                continue
            batch = []
            for item in claimed:
                self._held[item.job_id] = item.token
                self._requests.pop(item.job_id, None)
                batch.append((job_from_fields(item.fields), item.token))
            return batch, False
        return [], False

    # -- running -------------------------------------------------------------------------------
    async def _run_batch(self, batch: list[tuple[Job, str]]) -> None:
        jobs = [job for job, _ in batch]
        tokens = {job.id: token for job, token in batch}
        backend = self.registry.get(jobs[0].backend)
        log.info(
            "batch start backend=%s jobs=%s images=%d",
            backend.id,
            ",".join(job.id for job in jobs),
            sum(job.request.num_images for job in jobs),
            extra={"job_id": ",".join(job.id for job in jobs), "backend": backend.id, "status": "running"},
        )
        failed = await self._run(backend, jobs, tokens)
        if failed and len(jobs) > 1:
            # As in one process: a merged call that failed is retried one job at a time, so that each
            # job gets the result it would have had alone (the same attempt: nothing is claimed again).
            log.info("batch of %d failed; retrying its jobs one by one", len(jobs))
            for job in jobs:
                if job.id not in self._lost and not self._stop.is_set():
                    await self._run(backend, [job], tokens)
                elif self._stop.is_set():
                    await self._release([job], tokens)

    async def _run(self, backend: ImageBackend, batch: list[Job], tokens: dict[str, str]) -> bool:
        """One pipeline call. True when a merged batch failed with an error worth retrying job by job."""
        loop = asyncio.get_running_loop()
        progress = _ProgressSender(self, batch, tokens)

        def on_progress(step: int, total: int) -> None:  # from the backend's thread
            loop.call_soon_threadsafe(progress.push, step, total)

        timeout = self.settings.job_timeout
        started = asyncio.Event()

        def on_started() -> None:  # any thread: the backend says the batch has the device now
            ctx.deadline = time.monotonic() + timeout
            loop.call_soon_threadsafe(started.set)

        # The deadline counts from when the batch has the device (a device process restarting, a
        # model loading: not the job's time), as in one process (docs/operations.md).
        ctx = RunContext([job.id for job in batch], on_progress=on_progress, on_started=on_started)
        for index, job in enumerate(batch):
            self._contexts[job.id] = (ctx, index)
            if job.id in self._lost:
                ctx.cancel(index)
        if not backend.reports_start:
            ctx.mark_started()
        began = time.monotonic()
        results: list[list[GeneratedImage]] | None = None
        error: ServiceError | None = None
        call = asyncio.ensure_future(backend.generate([job.request for job in batch], ctx))
        try:
            waiter = asyncio.ensure_future(started.wait())
            try:
                await asyncio.wait({call, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if not call.done():
                await asyncio.wait({call}, timeout=max(0.0, ctx.deadline - time.monotonic()))
            if not call.done():
                # Past the deadline: the jobs are answered now (504), the call is stopped (a device
                # process that does not stop within SD_DEVICE_STOP_GRACE is killed and restarted) and
                # this slot takes no other batch until the backend has returned: the device is free.
                await progress.close()
                self._deadline_passed(batch, tokens, began)
                ctx.stop_reason = "deadline exceeded"
                ctx.cancel_all()
                call.cancel()
                await asyncio.wait({call})
                return False
            results = call.result()
            if len(results) != len(batch):
                raise GenerationFailedError("the backend returned a result per request that does not match")
        except ServiceError as exc:
            error = exc
        except asyncio.CancelledError:
            # The worker is stopping past its grace: end the call now and give the jobs back.
            ctx.stop_reason = "shutdown"
            ctx.urgent = True
            ctx.cancel_all()
            call.cancel()
            await asyncio.wait({call}, timeout=SHUTDOWN_STOP_WAIT)
            await progress.close()
            await self._release(batch, tokens)
            raise
        except Exception:
            log.exception("backend=%s raised an unexpected error", backend.id)
            error = GenerationFailedError("the backend failed unexpectedly; see the worker's log")
        finally:
            for job in batch:
                self._contexts.pop(job.id, None)
        await progress.close()  # every step is published before the final state
        seconds = time.monotonic() - began
        self._durations.append(seconds)
        if len(batch) > 1 and error is not None and not isinstance(error, (JobCancelledError, DeadlineExceededError)):
            return True
        # Storing images and finalizing happen off the slot, so the next batch can start now.
        task = asyncio.create_task(self._finish(batch, tokens, results, error, seconds))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        return False

    def _deadline_passed(self, batch: list[Job], tokens: dict[str, str], began: float) -> None:
        """Fail the batch's jobs with 504 now, while its call is still being stopped."""
        error = DeadlineExceededError(
            f"the job did not finish within {self.settings.job_timeout:g} s of getting the device (SD_JOB_TIMEOUT)"
        )
        seconds = time.monotonic() - began
        self._durations.append(seconds)
        task = asyncio.create_task(self._finish(batch, tokens, None, error, seconds))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _release(self, batch: list[Job], tokens: dict[str, str]) -> None:
        """Shutdown interrupted these jobs: back to their queue at once, the attempt not counted."""
        for job in batch:
            if job.id in self._lost:
                continue
            with contextlib.suppress(Exception):  # unreachable Redis: the lease lapses and it is reclaimed
                if await self.scripts.release(job.id, tokens[job.id]):
                    log.info("job=%s given back to its queue (worker stopping)", job.id)
            self._held.pop(job.id, None)

    async def _finish(
        self,
        batch: list[Job],
        tokens: dict[str, str],
        results: list[list[GeneratedImage]] | None,
        error: ServiceError | None,
        seconds: float,
    ) -> None:
        for index, job in enumerate(batch):
            try:
                await self._finish_one(
                    job, tokens[job.id], None if results is None else results[index], error, len(batch), seconds
                )
            except Exception:
                log.exception("job=%s could not be finished on this worker", job.id)
            finally:
                self._held.pop(job.id, None)
                self._lost.discard(job.id)

    async def _finish_one(
        self,
        job: Job,
        token: str,
        images: list[GeneratedImage] | None,
        error: ServiceError | None,
        batch_size: int,
        seconds: float,
    ) -> None:
        if job.id in self._lost:
            return  # cancelled, or someone else's run now: its images are discarded
        if error is not None or images is None:
            await self._finalize(job, token, JobStatus.FAILED, error=error or GenerationFailedError("no result"))
            return
        try:
            stored = await asyncio.to_thread(store_images, self.outputs, job, images)
        except OSError as exc:
            log.exception("job=%s could not store its images", job.id)
            message = (
                "no space left in SD_OUTPUT_DIR" if exc.errno == 28 else "could not write the image to SD_OUTPUT_DIR"
            )
            await self._finalize(job, token, JobStatus.FAILED, error=GenerationFailedError(message))
            return
        queued_ms = round(((job.started_at or job.created_at) - job.created_at) * 1000, 1)
        timings = Timings(queued_ms=queued_ms, generation_ms=round(seconds * 1000, 1), batch_size=batch_size)
        done = job.id not in self._lost and await self._finalize(
            job, token, JobStatus.SUCCEEDED, result=JobResult(images=stored, timings=timings)
        )
        if not done:
            await asyncio.to_thread(remove_images, self.outputs, stored)

    async def _finalize(
        self,
        job: Job,
        token: str,
        status: JobStatus,
        *,
        error: ServiceError | None = None,
        result: JobResult | None = None,
    ) -> bool:
        """Write the final state (first finisher wins); retried while Redis is unreachable. False when
        the job was already final (cancelled, or finished by another worker)."""
        error_body = None if error is None else {**error.to_dict(), "status_code": error.status_code}
        finished = time.time()
        backoff = 0.2
        while True:
            try:
                outcome = await self.scripts.finalize(
                    job.id,
                    token,
                    status.value,
                    finished,
                    None if result is None else result.to_dict(),
                    error_body,
                    job_ttl_ms(self.settings),
                )
                break
            except Exception as failure:
                if not is_unreachable(failure):
                    log.exception("job=%s could not be finalized", job.id)
                    return False
                if self._give_up_at is not None and time.monotonic() > self._give_up_at:
                    log.warning("job=%s: Redis unreachable at shutdown; it runs again after its lease", job.id)
                    return False
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
        if outcome != 1:
            log.info(
                "job=%s was already final (cancelled, or finished elsewhere): this run's result is dropped", job.id
            )
            return False
        log_final(log, job, status, finished, None if error_body is None else error_body["type"])
        return True


class _ProgressSender:
    """Publishes a batch's steps in order (every step reaches the SSE listeners), one script call at
    a time; a job the script says is no longer this run's is stopped."""

    def __init__(self, worker: Worker, batch: list[Job], tokens: dict[str, str]) -> None:
        self.worker = worker
        self.batch = batch
        self.tokens = tokens
        self.queue: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue()
        self.task = asyncio.create_task(self._send())

    def push(self, step: int, total: int) -> None:
        self.queue.put_nowait((step, total))

    async def close(self) -> None:
        if not self.task.done():
            self.queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await self.task

    async def _send(self) -> None:
        worker = self.worker
        while True:
            item = await self.queue.get()
            if item is None:
                return
            step, total = item
            runs = [(job.id, self.tokens[job.id]) for job in self.batch if job.id not in worker._lost]
            if not runs:
                continue
            data = {"step": step, "total": total, "fraction": round(step / total, 4) if total else 0.0}
            try:
                current = await worker.scripts.progress(worker.name, step, total, data, runs)
            except Exception as error:
                if not is_unreachable(error):
                    log.exception("progress could not be published")
                while not self.queue.empty():  # Redis is away: drop the steps waiting, keep the end marker
                    if self.queue.get_nowait() is None:
                        return
                continue
            for (job_id, _), mine in zip(runs, current, strict=True):
                if not mine:
                    worker._lose(job_id, "cancelled, finished or taken over elsewhere")
