"""RedisJobEngine: the engine of an API replica in a cluster (docs/scale-out.md).

It admits jobs into Redis (one atomic script: the global SD_MAX_QUEUE holds across replicas), reads
them back for every route, cancels them from any replica, relays every job event published in Redis
to this replica's SSE listeners and waiters, delivers webhooks from the shared outbox, keeps a
snapshot of the fleet's heartbeats, and takes over lapsed leases like every node. It never runs a
job: workers do (engine/distributed/worker.py).

While Redis is unreachable every call that needs it raises QueueUnavailableError (503 +
Retry-After), `problem()` says why for /health, and the background loops retry until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from imagegen.backends.registry import BackendRegistry
from imagegen.config import Settings
from imagegen.engine.base import Engine, EngineProblem
from imagegen.engine.distributed.codec import job_from_fields, new_job_fields, webhook_field
from imagegen.engine.distributed.connection import RETRY_AFTER, connect, describe, is_unreachable, unavailable
from imagegen.engine.distributed.fleet import Fleet, WorkerReport
from imagegen.engine.distributed.keys import Keys, route_of, split_route
from imagegen.engine.distributed.scripts import Scripts
from imagegen.engine.distributed.upkeep import Upkeep, job_ttl_ms
from imagegen.engine.events import JobEvents
from imagegen.engine.jobs import FINAL_STATES, Job, JobStatus, new_job_id
from imagegen.engine.webhooks import WebhookSender
from imagegen.errors import (
    ConflictError,
    JobCancelledError,
    NotFoundError,
    QueueFullError,
    QueueUnavailableError,
    ServiceDrainingError,
)
from imagegen.generation import GenerationParams, GenerationRequest
from imagegen.storage.outputs import OutputStore
from imagegen.storage.shared import output_sharing

log = logging.getLogger("imagegen.cluster")

#: Seconds between two fleet snapshots (health, routing), and between two looks at a waited job.
FLEET_REFRESH = 0.5
_WAIT_RECHECK = 2.0
_FINAL_EVENTS = frozenset(status.value for status in FINAL_STATES)


def node_name(kind: str) -> str:
    """A unique, readable name for this process in the cluster (consumer name, logs)."""
    return f"{kind}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class _KeepOutcome:
    """The webhook sender writes a delivery's outcome to the job; here the replica writes it to Redis."""

    def update(self, job: Job) -> None:
        pass


class RedisJobEngine(Engine):
    def __init__(
        self,
        settings: Settings,
        registry: BackendRegistry,
        outputs: OutputStore,
        events: JobEvents,
        fleet: Fleet,
        webhooks: WebhookSender | None = None,
        on_final: Callable[[Job], None] | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.registry = registry
        self.outputs = outputs
        self.events = events
        self.fleet = fleet
        self.webhooks = webhooks
        self._on_final = on_final
        self.name = node_name("api")
        self.keys = Keys.for_prefix(settings.redis_prefix)
        self.conn = connect(settings, self.name)
        self.scripts = Scripts(self.conn, self.keys)
        self.upkeep = Upkeep(settings, self.conn, self.keys, self.scripts, self.name)
        self.draining = False
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        #: job id -> (set when a final event for it arrives, so wait() looks again; how many wait)
        self._finals: dict[str, tuple[asyncio.Event, int]] = {}
        #: jobs admitted here and not final yet: their final state is counted in this process's metrics
        self._admitted: set[str] = set()
        #: the queue position last told to this replica's listeners, per job (no repeats)
        self._positions: dict[str, int] = {}
        self._positions_due: asyncio.Event = asyncio.Event()
        self._outbox_due: asyncio.Event = asyncio.Event()
        self._down: tuple[float, str] | None = None
        self._warnings: list[str] = []
        self._outbox_slots = asyncio.Semaphore(16)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        log.info("API replica %s: jobs in Redis at %s (distributed mode)", self.name, describe(self.settings))
        sharing = output_sharing(self.outputs.root)
        if sharing.shared is False:
            log.warning("START-UP: %s", sharing.message(self.outputs.root))
            self.add_warning(sharing.message(self.outputs.root))
        else:
            log.info("%s", sharing.message(self.outputs.root))
        try:
            await self.scripts.ensure_group()
            await self._check_memory_policy()
            await self.refresh_fleet()
        except Exception as error:
            if not is_unreachable(error):
                raise
            self._mark_down(error)
            log.error("START-UP: Redis at %s is unreachable; answering 503 until it is", describe(self.settings))
        for loop in (self._refresh_loop(), self._relay_loop(), self.upkeep.run(self._stop), self._positions_loop()):
            self._spawn(loop)
        if self.webhooks is not None:
            self._spawn(self._outbox_loop())

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def begin_drain(self) -> None:
        if not self.draining:
            log.info("draining: new jobs are refused; jobs in the cluster go on")
        self.draining = True

    async def shutdown(self, grace: float) -> None:
        """Refuse new jobs; synchronous callers get up to `grace` seconds for their jobs (which the
        workers run anyway); then stop the loops and close the connections."""
        self.begin_drain()
        deadline = time.monotonic() + grace
        while self._sync_waiters and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stop.set()
        for event, _ in self._finals.values():
            event.set()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self.webhooks is not None:
            await self.webhooks.close()
        await self.conn.aclose()

    # -- Redis availability ----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _redis(self) -> AsyncIterator[None]:
        """Redis errors become 503 (queue_unavailable) and mark the engine down until Redis answers."""
        try:
            yield
        except Exception as error:
            if not is_unreachable(error):
                raise
            self._mark_down(error)
            raise unavailable(error) from None

    def _mark_down(self, error: BaseException) -> None:
        if self._down is None:
            log.warning("Redis at %s is unreachable (%s)", describe(self.settings), type(error).__name__)
            self._down = (time.monotonic(), type(error).__name__)

    def _mark_up(self) -> None:
        if self._down is not None:
            log.info("Redis at %s answers again", describe(self.settings))
            self._down = None

    def problem(self) -> EngineProblem | None:
        if self._down is None:
            return None
        since, kind = self._down
        return EngineProblem(
            "redis_unreachable",
            f"the job queue (Redis at {describe(self.settings)}) has been unreachable for "
            f"{time.monotonic() - since:.0f} s ({kind}): no job can be admitted or read; retrying",
            RETRY_AFTER,
        )

    def health_details(self) -> dict[str, Any]:
        live = self.fleet.live()
        warnings = list(self._warnings)
        for worker in self.fleet.unseen_outputs:
            warnings.append(
                f"worker {worker} writes images into a folder this replica does not see (SD_OUTPUT_DIR must be "
                "one folder every node shares): its images are 404 here"
            )
        return {
            "mode": "distributed",
            "redis": {
                "state": "ok" if self._down is None else "unreachable",
                "location": describe(self.settings),
            },
            "workers": [
                {
                    "name": worker.name,
                    "host": worker.host,
                    "backends": sorted(worker.backends),
                    "running": len(worker.running),
                    "seen_seconds_ago": round(worker.age, 1),
                }
                for worker in live
            ],
            "warnings": warnings,
        }

    async def _check_memory_policy(self) -> None:
        try:
            policy = (await self.conn.config_get("maxmemory-policy")).get("maxmemory-policy")
        except Exception as error:  # CONFIG is often disabled on managed Redis: nothing to check then
            if is_unreachable(error):
                raise
            return
        if policy and policy != "noeviction":
            message = (
                f"Redis maxmemory-policy is {policy}: it may evict jobs under memory pressure; set noeviction "
                "(docs/scale-out.md)"
            )
            log.warning("START-UP: %s", message)
            self._warnings.append(message)

    def add_warning(self, message: str) -> None:
        """A start-up finding shown in /health (e.g. an output folder that looks local-only)."""
        self._warnings.append(message)

    # -- the fleet snapshot ----------------------------------------------------------------------
    async def refresh_fleet(self) -> None:
        async with self.conn.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.zrange(self.keys.workers_seen, 0, -1, withscores=True)
            pipe.hgetall(self.keys.workers)
            (seconds, micros), seen, payloads = await pipe.execute()
        now = float(seconds) + float(micros) / 1e6
        reports = []
        for name, seen_at in seen:
            payload = payloads.get(name)
            if payload is None:
                continue
            try:
                reports.append(WorkerReport.parse(str(name), json.loads(payload), float(seen_at), now - float(seen_at)))
            except (ValueError, TypeError, KeyError):
                log.warning("worker %s sent a heartbeat this replica cannot read", name)
        self.fleet.update(reports)
        self.fleet.unseen_outputs = await asyncio.to_thread(self._unseen_outputs, self.fleet.live())
        self._mark_up()

    def _unseen_outputs(self, workers: list[WorkerReport]) -> list[str]:
        root = Path(self.outputs.root)
        return [worker.name for worker in workers if worker.probe and not (root / worker.probe).exists()]

    async def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await self.refresh_fleet()
            except Exception as error:
                if is_unreachable(error):
                    self._mark_down(error)
                else:
                    log.exception("fleet refresh failed")
            await self._sleep(FLEET_REFRESH)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

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
        await self._check_route(backend.id, None)  # not configured anywhere: refused before the parameters
        request = backend.resolve(params)
        await self._check_route(backend.id, request.model)
        if callback_url is not None and self.webhooks is not None:
            self.webhooks.validate(callback_url)
        job = Job(id=new_job_id(), request=request, priority=priority, callback_url=callback_url, request_id=request_id)
        route = route_of(job.backend, request.model)
        async with self._redis():
            admitted, number = await self.scripts.admit(
                self.settings.max_queue,
                job.id,
                job.created_at,
                priority,
                route,
                new_job_fields(job, route=route, replica=self.name),
            )
        if not admitted:
            raise QueueFullError(
                f"the queue is full ({number} jobs waiting, SD_MAX_QUEUE={self.settings.max_queue}); retry later",
                retry_after=self._retry_after(number),
            )
        self._positions[job.id] = number
        if len(self._admitted) < 100_000:
            self._admitted.add(job.id)
        log.info(
            "job=%s queued backend=%s images=%d request_id=%s",
            job.id,
            job.backend,
            request.num_images,
            request_id,
            extra={"job_id": job.id, "backend": job.backend, "status": "queued"},
        )
        return job

    async def _check_route(self, backend_id: str, model: str | None) -> None:
        if self._down is not None:
            return  # the snapshot is stale: the admission itself says whether Redis is back
        error = self.fleet.admission_error(backend_id, model)
        if error is not None:
            # A worker that started a moment ago is not in the snapshot yet: look again before refusing.
            async with self._redis():
                await self.refresh_fleet()
            error = self.fleet.admission_error(backend_id, model)
        if error is not None:
            raise error

    def _retry_after(self, queued: int) -> int:
        """Seconds until a slot is likely free: the workers' recent batch time x queue / live slots."""
        average = self.fleet.batch_seconds() or 5.0
        return max(1, min(300, math.ceil(average * max(1, queued) / max(1, self.fleet.slots()))))

    # -- queries -------------------------------------------------------------------------------
    async def _fetch(self, job_id: str) -> Job | None:
        async with self._redis():
            fields = await self.conn.hgetall(self.keys.job(job_id))
        return job_from_fields(fields) if fields else None

    async def get(self, job_id: str) -> Job:
        job = await self._fetch(job_id)
        if job is None:
            raise NotFoundError("no such job")
        return job

    async def queue_position(self, job: Job) -> int | None:
        if job.status is not JobStatus.QUEUED:
            return None
        async with self._redis():
            status, route, rank = await self.conn.hmget(self.keys.job(job.id), ["status", "route", "rank"])
            if status != JobStatus.QUEUED.value or not route or not rank:
                return None
            position = int(await self.conn.zcount(self.keys.queue(str(route)), "-inf", f"({rank!s}"))
        self._positions[job.id] = position
        return position

    async def list_jobs(
        self,
        *,
        status: JobStatus | None = None,
        backend: str | None = None,
        limit: int = 50,
        before: float | None = None,
        prompt: str | None = None,
    ) -> list[Job]:
        wanted = prompt.casefold() if prompt else None
        newest = f"({before!r}" if before is not None else "+inf"
        chunk = max(limit, 100)
        offset = 0
        found: list[Job] = []
        async with self._redis():
            while len(found) < limit:
                ids = [
                    str(job_id)
                    for job_id in await self.conn.zrevrangebyscore(
                        self.keys.jobs, newest, "-inf", start=offset, num=chunk
                    )
                ]
                if not ids:
                    break
                offset += len(ids)
                async with self.conn.pipeline(transaction=False) as pipe:
                    for job_id in ids:
                        pipe.hgetall(self.keys.job(job_id))
                    rows = await pipe.execute()
                expired = []
                for job_id, fields in zip(ids, rows, strict=True):
                    if not fields:
                        expired.append(job_id)
                        continue
                    job = job_from_fields(fields)
                    if (
                        (status is None or job.status is status)
                        and (backend is None or job.backend == backend)
                        and (wanted is None or wanted in job.request.prompt.casefold())
                    ):
                        found.append(job)
                if expired:
                    await self.conn.zrem(self.keys.jobs, *expired)
                if len(ids) < chunk:
                    break
        return found[:limit]

    async def inputs_in_use(self) -> set[str]:
        """The input images every unfinished job of the cluster refers to (queued in any route, or
        running on any worker): the shared input folder is pruned by every replica."""
        async with self._redis():
            ids = {str(job_id) for job_id in await self.conn.smembers(self.keys.running)}
            for route in await self.conn.smembers(self.keys.routes):
                ids.update(str(job_id) for job_id in await self.conn.zrange(self.keys.queue(str(route)), 0, -1))
            ordered = sorted(ids)
            async with self.conn.pipeline(transaction=False) as pipe:
                for job_id in ordered:
                    pipe.hget(self.keys.job(job_id), "request")
                requests = await pipe.execute()
        found: set[str] = set()
        for raw in requests:
            if not raw:
                continue
            request = GenerationRequest.model_validate_json(raw)
            found.update(image.sha256 for image in request.images)
            if request.mask is not None:
                found.add(request.mask.sha256)
        return found

    async def running(self) -> list[Job]:
        async with self._redis():
            ids = sorted(str(job_id) for job_id in await self.conn.smembers(self.keys.running))
            async with self.conn.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(self.keys.job(job_id))
                rows = await pipe.execute()
        jobs = [job_from_fields(fields) for fields in rows if fields]
        return [job for job in jobs if job.status is JobStatus.RUNNING]

    async def stats(self) -> dict[str, Any]:
        async with self._redis():
            async with self.conn.pipeline(transaction=False) as pipe:
                pipe.zcard(self.keys.queued)
                pipe.scard(self.keys.running)
                pipe.smembers(self.keys.routes)
                pipe.hgetall(self.keys.stats)
                queued, running, routes, counters = await pipe.execute()
            routes = sorted(routes)
            async with self.conn.pipeline(transaction=False) as pipe:
                for route in routes:
                    pipe.zcard(self.keys.queue(route))
                depths = await pipe.execute()
        lanes: dict[str, dict[str, int]] = {}
        lane_of = {backend.id: backend.lane for backend in self.registry}
        for backend in self.registry:
            lanes.setdefault(backend.lane, {"queued": 0, "busy": 0, "concurrency": 0})
        by_route = []
        for route, depth in zip(routes, depths, strict=True):
            backend_id, model = split_route(route)
            by_route.append({"backend": backend_id, "model": model, "queued": int(depth)})
            lane = lanes.setdefault(lane_of.get(backend_id, backend_id), {"queued": 0, "busy": 0, "concurrency": 0})
            lane["queued"] += int(depth)
        for worker in self.fleet.live():
            for name, values in worker.lanes.items():
                lane = lanes.setdefault(name, {"queued": 0, "busy": 0, "concurrency": 0})
                lane["busy"] += int(values.get("busy", 0))
                lane["concurrency"] += int(values.get("concurrency", 0))
        return {
            "queued": int(queued),
            "running": int(running),
            "max_queue": self.settings.max_queue,
            "draining": self.draining,
            "lanes": lanes,
            "fleet": {
                "routes": by_route,
                "live_workers": self.fleet.live_counts(self.registry.ids()),
                "workers": len(self.fleet.live()),
                "counters": {key: int(value) for key, value in counters.items()},
            },
        }

    # -- waiting and cancel --------------------------------------------------------------------
    async def wait(self, job_id: str) -> Job:
        """Until the job is final: woken by its final event, and looking again every few seconds
        (an event missed while Redis restarted); an unreachable Redis is waited out."""
        final, waiters = self._finals.get(job_id, (asyncio.Event(), 0))
        self._finals[job_id] = (final, waiters + 1)
        try:
            while True:
                if self._stop.is_set():
                    raise ServiceDrainingError(
                        f"this API replica is shutting down; job {job_id} goes on in the cluster "
                        "(GET /api/jobs/{id} on another replica)"
                    )
                try:
                    job: Job | None = await self.get(job_id)
                except QueueUnavailableError:
                    job = None
                if job is not None and job.final:
                    return job
                final.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(final.wait(), timeout=_WAIT_RECHECK if job is not None else 1.0)
        finally:
            event, count = self._finals.get(job_id, (final, 1))
            if count <= 1:
                self._finals.pop(job_id, None)
            else:
                self._finals[job_id] = (event, count - 1)

    async def cancel(self, job_id: str, reason: str = "cancelled by request") -> Job:
        error = JobCancelledError(reason)
        async with self._redis():
            outcome, before = await self.scripts.cancel(
                job_id, time.time(), {**error.to_dict(), "status_code": error.status_code}, job_ttl_ms(self.settings)
            )
        if outcome == -1:
            raise NotFoundError("no such job")
        if outcome == 0 and before != JobStatus.CANCELLED.value:
            raise ConflictError(f"job already {before}")
        if outcome == 1:
            log.info("job=%s cancelled (was %s): %s", job_id, before, reason)
        return await self.get(job_id)

    # -- events from the cluster ----------------------------------------------------------------
    async def _relay_loop(self) -> None:
        """One subscription to the cluster's job events, handed to this replica's listeners."""
        backoff = 0.2
        while not self._stop.is_set():
            pubsub = self.conn.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.keys.events)
                await self._resync()  # events sent while this replica was not subscribed are lost: look again
                backoff = 0.2
                while not self._stop.is_set():
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._on_event(str(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if is_unreachable(error):
                    self._mark_down(error)
                else:
                    log.exception("event relay failed; subscribing again")
                await self._sleep(backoff)
                backoff = min(2.0, backoff * 2)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _on_event(self, raw: str) -> None:
        try:
            message = json.loads(raw)
            job_id, event, data = str(message["job"]), str(message["event"]), dict(message["data"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a job event this replica cannot read")
            return
        if event == "queued":
            position = data.get("queue_position")
            if position is not None and self._positions.get(job_id) == position:
                return  # this replica's listeners were told already
            if position is not None and self.events.listeners(job_id):
                self._positions[job_id] = int(position)
        self.events.publish(job_id, event, data)
        if event in _FINAL_EVENTS:
            self._positions.pop(job_id, None)
            waiter = self._finals.get(job_id)
            if waiter is not None:
                waiter[0].set()
            if job_id in self._admitted:
                self._admitted.discard(job_id)
                self._spawn(self._count_final(job_id))
            self._outbox_due.set()
        if event in ("running", "queued") or event in _FINAL_EVENTS:
            self._positions_due.set()

    async def _count_final(self, job_id: str) -> None:
        if self._on_final is None:
            return
        with contextlib.suppress(Exception):  # metrics never stand in a job's way
            job = await self.get(job_id)
            self._on_final(job)

    async def _resync(self) -> None:
        """After (re)subscribing: jobs followed here that ended meanwhile get their final event."""
        followed = set(self.events.listened()) | set(self._finals)
        if not followed:
            return
        ids = sorted(followed)
        async with self.conn.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(self.keys.job(job_id), "status")
            statuses = await pipe.execute()
        for job_id, status in zip(ids, statuses, strict=True):
            if status in _FINAL_EVENTS:
                self._on_event(json.dumps({"job": job_id, "event": status, "data": {"status": status}}))
        self._positions_due.set()

    async def _positions_loop(self) -> None:
        """Queue positions change when a job ahead starts or leaves: listeners here hear the new one."""
        while not self._stop.is_set():
            await self._positions_due.wait()
            self._positions_due.clear()
            await self._sleep(0.05)  # one look for a burst of events
            listened = [job_id for job_id in self.events.listened() if job_id in self._positions]
            if not listened:
                continue
            try:
                async with self.conn.pipeline(transaction=False) as pipe:
                    for job_id in listened:
                        pipe.hmget(self.keys.job(job_id), ["status", "route", "rank"])
                    rows = await pipe.execute()
                for job_id, (status, route, rank) in zip(listened, rows, strict=True):
                    if status != JobStatus.QUEUED.value or not route:
                        self._positions.pop(job_id, None)
                        continue
                    position = int(await self.conn.zcount(self.keys.queue(str(route)), "-inf", f"({rank!s}"))
                    if self._positions.get(job_id) != position:
                        self._positions[job_id] = position
                        self.events.publish(job_id, "queued", {"status": "queued", "queue_position": position})
            except Exception as error:
                if not is_unreachable(error):
                    log.exception("queue positions could not be updated")

    # -- webhooks from the shared outbox ------------------------------------------------------------
    def _delivery_lease(self) -> float:
        """Longer than one delivery with all its retries can take: then another replica may try."""
        settings = self.settings
        return settings.webhook_max_attempts * (settings.webhook_timeout + 60.0) + 30.0

    async def _outbox_loop(self) -> None:
        while not self._stop.is_set():
            try:
                now = time.time()
                due = await self.scripts.claim_webhooks(now, now + self._delivery_lease())
                for job_id in due:
                    await self._outbox_slots.acquire()
                    self._spawn(self._deliver(job_id))
            except Exception as error:
                if not is_unreachable(error):
                    log.exception("webhook outbox failed")
            self._outbox_due.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox_due.wait(), timeout=1.0)

    async def _deliver(self, job_id: str) -> None:
        try:
            assert self.webhooks is not None
            job = await self._fetch(job_id)
            if job is not None and job.callback_url:
                await self.webhooks.deliver(job, _KeepOutcome())
                await self.conn.hset(self.keys.job(job_id), "webhook", webhook_field(job.webhook))
            await self.conn.zrem(self.keys.outbox, job_id)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the lease runs out and a replica tries again
            if not is_unreachable(error):
                log.exception("job=%s webhook delivery failed", job_id)
        finally:
            self._outbox_slots.release()
