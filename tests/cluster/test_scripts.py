"""The cluster's Lua scripts on a real Redis, one rule at a time (engine/distributed/scripts.py): the
queue limit is atomic, a job is claimed by one worker, priorities and admission order survive a
takeover, the first finisher wins and the other run is told to stop, a given-back job is not counted
as an attempt, progress renews only the current run."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from imagegen.config import Settings
from imagegen.engine.distributed.connection import connect
from imagegen.engine.distributed.keys import GROUP, Keys, rank_of, route_of
from imagegen.engine.distributed.scripts import Scripts
from tests.support.cluster import unique_prefix
from tests.support.redis_server import RedisServer

# The fixture's client lives on the session's event loop (asyncio_default_fixture_loop_scope): so do the tests.
pytestmark = pytest.mark.asyncio(loop_scope="session")

ROUTE = route_of("fake", "fake-model")
_ids = itertools.count(1)


@pytest.fixture
async def scripts(redis_server: RedisServer) -> AsyncIterator[Scripts]:
    settings = Settings(_env_file=None, redis_url=redis_server.url, redis_prefix=unique_prefix())
    conn = connect(settings, "test-scripts")
    made = Scripts(conn, Keys.for_prefix(settings.redis_prefix))
    await made.ensure_group()
    yield made
    await conn.aclose()


async def admit(
    scripts: Scripts, *, priority: int = 0, max_queue: int = 100, job_id: str | None = None
) -> tuple[str, bool]:
    job_id = job_id or f"{next(_ids):032x}"
    fields = {"id": job_id, "status": "queued", "route": ROUTE, "created_at": repr(time.time()), "attempts": "0"}
    ok, _ = await scripts.admit(max_queue, job_id, time.time(), priority, ROUTE, fields)
    return job_id, ok


async def status(scripts: Scripts, job_id: str) -> dict[str, Any]:
    return dict(await scripts.conn.hgetall(scripts.keys.job(job_id)))


async def test_admission_never_exceeds_the_limit_under_concurrency(scripts: Scripts) -> None:
    outcomes = await asyncio.gather(*(admit(scripts, max_queue=10) for _ in range(60)))
    assert sum(ok for _, ok in outcomes) == 10
    assert await scripts.conn.zcard(scripts.keys.queued) == 10


async def test_ranks_order_by_priority_then_admission(scripts: Scripts) -> None:
    low, _ = await admit(scripts, priority=-3)
    first, _ = await admit(scripts)
    high, _ = await admit(scripts, priority=7)
    second, _ = await admit(scripts)
    order = await scripts.conn.zrange(scripts.keys.queue(ROUTE), 0, -1)
    assert order == [high, first, second, low]
    assert rank_of(7, 1) < rank_of(0, 1) < rank_of(0, 2) < rank_of(-3, 0)


async def test_a_job_is_claimed_once_and_gone_companions_are_skipped(scripts: Scripts) -> None:
    head, _ = await admit(scripts)
    companion, _ = await admit(scripts)
    gone, _ = await admit(scripts)
    await scripts.cancel(gone, time.time(), {"type": "cancelled"}, 0)
    first, second = await asyncio.gather(
        scripts.claim("worker-a", time.time(), [head, companion, gone]),
        scripts.claim("worker-b", time.time(), [head, companion, gone]),
    )
    winner = first or second
    assert (first == []) != (second == [])
    assert [item.job_id for item in winner] == [head, companion]
    assert [item.attempts for item in winner] == [1, 1]
    pending = await scripts.conn.xpending(scripts.keys.runs, GROUP)
    assert pending["pending"] == 2
    job = await status(scripts, head)
    assert job["status"] == "running" and job["run"] == winner[0].token
    assert await scripts.conn.zcard(scripts.keys.queued) == 0


async def test_a_lapsed_lease_puts_the_job_back_in_its_place(scripts: Scripts) -> None:
    taken, _ = await admit(scripts)
    behind, _ = await admit(scripts)
    await scripts.claim("worker-a", time.time(), [taken])
    outcome = await scripts.reclaim("reclaimer", 0, 3, time.time(), 0, {"type": "generation_failed"})
    assert outcome == [(taken, "requeued")]
    assert await scripts.conn.zrange(scripts.keys.queue(ROUTE), 0, -1) == [taken, behind]
    job = await status(scripts, taken)
    assert job["status"] == "queued" and job["attempts"] == "1" and job["run"] == ""
    counters = await scripts.conn.hgetall(scripts.keys.stats)
    assert counters == {"lease_expired": "1", "reclaimed": "1"}
    assert (await scripts.conn.xpending(scripts.keys.runs, GROUP))["pending"] == 0


async def test_after_the_last_attempt_a_lapsed_lease_fails_the_job(scripts: Scripts) -> None:
    job_id, _ = await admit(scripts)
    await scripts.claim("worker-a", time.time(), [job_id])
    error = {"type": "generation_failed", "message": "lease lapsed", "param": None, "status_code": 500}
    assert await scripts.reclaim("reclaimer", 0, 1, time.time(), 0, error) == [(job_id, "failed")]
    job = await status(scripts, job_id)
    assert job["status"] == "failed" and json.loads(job["error"])["message"] == "lease lapsed"


async def test_the_first_finisher_wins_and_the_other_run_is_told_to_stop(scripts: Scripts) -> None:
    job_id, _ = await admit(scripts)
    (first,) = await scripts.claim("worker-a", time.time(), [job_id])
    await scripts.reclaim("reclaimer", 0, 3, time.time(), 0, {"type": "x"})  # worker-a stalled
    (second,) = await scripts.claim("worker-b", time.time(), [job_id])
    pubsub = scripts.conn.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(scripts.keys.control)
    # worker-a comes back and finishes first: its result stands, worker-b's run is cancelled.
    result = {"images": [], "timings": {"queued_ms": 1.0, "generation_ms": 2.0, "batch_size": 1}}
    assert await scripts.finalize(job_id, first.token, "succeeded", time.time(), result, None, 60_000) == 1
    message = None
    for _ in range(20):  # the subscription's confirmation comes first (and reads as None)
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None:
            break
    assert message is not None and json.loads(message["data"]) == {"cancel": job_id}
    await pubsub.aclose()
    assert await scripts.finalize(job_id, second.token, "succeeded", time.time(), result, None, 60_000) == 0
    assert (await scripts.conn.hgetall(scripts.keys.stats))["finalize_refused"] == "1"
    assert (await scripts.conn.xpending(scripts.keys.runs, GROUP))["pending"] == 0
    assert 0 < await scripts.conn.pttl(scripts.keys.job(job_id)) <= 60_000


async def test_progress_renews_only_the_current_run(scripts: Scripts) -> None:
    job_id, _ = await admit(scripts)
    (claimed,) = await scripts.claim("worker-a", time.time(), [job_id])
    data = {"step": 1, "total": 4, "fraction": 0.25}
    assert await scripts.progress("worker-a", 1, 4, data, [(job_id, claimed.token)]) == [True]
    assert (await status(scripts, job_id))["step"] == "1"
    assert await scripts.progress("worker-a", 2, 4, data, [(job_id, "0-1")]) == [False]
    await scripts.cancel(job_id, time.time(), {"type": "cancelled"}, 0)
    assert await scripts.progress("worker-a", 2, 4, data, [(job_id, claimed.token)]) == [False]


async def test_a_job_given_back_at_shutdown_is_not_counted(scripts: Scripts) -> None:
    job_id, _ = await admit(scripts)
    (claimed,) = await scripts.claim("worker-a", time.time(), [job_id])
    assert await scripts.release(job_id, claimed.token) is True
    job = await status(scripts, job_id)
    assert job["status"] == "queued" and job["attempts"] == "0"
    assert await scripts.release(job_id, claimed.token) is False


async def test_webhook_deliveries_are_leased(scripts: Scripts) -> None:
    await scripts.conn.zadd(scripts.keys.outbox, {"a" * 32: 1.0, "b" * 32: time.time() + 3600})
    now = time.time()
    assert await scripts.claim_webhooks(now, now + 60) == ["a" * 32]
    assert await scripts.claim_webhooks(now, now + 60) == []  # leased to the first caller


async def test_heartbeats_use_the_clock_of_redis(scripts: Scripts) -> None:
    stamp = await scripts.heartbeat("worker-a", {"backends": {}})
    seconds, micros = await scripts.conn.time()
    assert abs(stamp - (seconds + micros / 1e6)) < 5
    assert await scripts.conn.zscore(scripts.keys.workers_seen, "worker-a") == pytest.approx(stamp, abs=1e-3)
