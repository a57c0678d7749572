"""What every node of a cluster does in the background (workers and replicas alike, so that nothing
depends on one of them): take over the jobs whose lease lapsed, prune the job index of expired jobs,
forget workers and stream consumers gone for good.

Taking over is one script (scripts.py `reclaim`): `XAUTOCLAIM` hands the lapsed stream entries to
this node atomically (two nodes never both get one); each job then goes back to the front of its
queue (its rank kept), or fails once it has had SD_MAX_ATTEMPTS runs. Any worker serving the job's
route then claims it, as for a new job: the node that reclaims need not serve it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from imagegen.config import Settings
from imagegen.engine.distributed.connection import is_unreachable
from imagegen.engine.distributed.fleet import forget_seconds
from imagegen.engine.distributed.keys import GROUP, Keys
from imagegen.engine.distributed.scripts import Scripts
from imagegen.errors import GenerationFailedError

log = logging.getLogger("imagegen.cluster")

#: Seconds between two index/fleet clean-ups (the reclaim scan runs far more often).
_CLEANUP_EVERY = 60.0


def reclaim_interval(lease: float) -> float:
    """Seconds between two scans for lapsed leases: a takeover happens within lease + this."""
    return min(1.0, lease / 8)


def job_ttl_ms(settings: Settings) -> int:
    return int(settings.redis_job_ttl_days * 86_400_000)


class Upkeep:
    def __init__(self, settings: Settings, conn: Redis, keys: Keys, scripts: Scripts, consumer: str) -> None:
        self.settings = settings
        self.conn = conn
        self.keys = keys
        self.scripts = scripts
        self.consumer = consumer
        self._next_cleanup = time.monotonic() + 5.0
        self._error = GenerationFailedError(
            "the worker running this job stopped renewing its lease (SD_WORKER_LEASE_SECONDS) on each of its "
            f"{settings.max_attempts} runs; not retried again (SD_MAX_ATTEMPTS)"
        )

    async def run(self, stop: asyncio.Event) -> None:
        interval = reclaim_interval(self.settings.worker_lease_seconds)
        quiet = False  # log an unreachable Redis once, not every interval
        while not stop.is_set():
            try:
                await self.reclaim_once()
                if time.monotonic() >= self._next_cleanup:
                    self._next_cleanup = time.monotonic() + _CLEANUP_EVERY
                    await self.cleanup()
                quiet = False
            except Exception as error:  # the loop must survive anything; Redis outages are expected
                if is_unreachable(error):
                    if not quiet:
                        log.warning("upkeep: Redis unreachable (%s); retrying", type(error).__name__)
                    quiet = True
                else:
                    log.exception("upkeep failed; retrying")
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except TimeoutError:
                pass

    async def reclaim_once(self) -> list[tuple[str, str]]:
        """Take over every lapsed lease now; (job id, "requeued" | "failed") for each."""
        error = {**self._error.to_dict(), "status_code": self._error.status_code}
        try:
            outcome = await self.scripts.reclaim(
                self.consumer,
                int(self.settings.worker_lease_seconds * 1000),
                self.settings.max_attempts,
                time.time(),
                job_ttl_ms(self.settings),
                error,
            )
        except ResponseError as failure:
            if "NOGROUP" not in str(failure):
                raise
            await self.scripts.ensure_group()  # Redis lost its data (no AOF): start the stream again
            return []
        for job_id, what in outcome:
            if what == "failed":
                log.warning(
                    "job=%s lease lapsed; failed after %d runs (SD_MAX_ATTEMPTS)", job_id, self.settings.max_attempts
                )
            else:
                log.warning("job=%s lease lapsed (its worker stopped); back in its queue for another worker", job_id)
        return outcome

    async def cleanup(self) -> None:
        removed = await self.scripts.prune()
        if removed:
            log.debug("pruned %d expired jobs from the index", removed)
        seconds, micros = await self.conn.time()
        cutoff = float(seconds) + float(micros) / 1e6 - forget_seconds(self.settings.worker_lease_seconds)
        gone = [str(name) for name in await self.conn.zrangebyscore(self.keys.workers_seen, "-inf", cutoff)]
        if gone:
            await self.conn.hdel(self.keys.workers, *gone)
            await self.conn.zrem(self.keys.workers_seen, *gone)
        try:
            consumers = await self.conn.xinfo_consumers(self.keys.runs, GROUP)
        except ResponseError:  # no stream yet
            return
        limit_ms = forget_seconds(self.settings.worker_lease_seconds) * 1000
        for consumer in consumers:
            if int(consumer.get("pending", 0)) == 0 and int(consumer.get("idle", 0)) > limit_ms:
                await self.conn.xgroup_delconsumer(self.keys.runs, GROUP, str(consumer["name"]))
