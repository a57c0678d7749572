"""A cluster under failure, for real: worker processes killed with SIGKILL mid-job or frozen with
SIGSTOP, Redis killed and restarted on its AOF, API replicas in their own processes racing for the
last queue slots, cancel and SSE across processes, webhooks once. Short leases (2 s) and small step
delays keep each test to a few seconds (docs/scale-out.md, "What happens when...")."""

from __future__ import annotations

import asyncio
import collections
import signal
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.engine.test_contract import submit, wait_status
from tests.engine.test_webhooks import Receiver
from tests.support.cluster import Deployer, Deployment
from tests.support.redis_server import RedisServer, available
from tests.support.scrape import scrape, value
from tests.support.server import LiveServer
from tests.support.sse import read_events

LEASE = 2.0

pytestmark = pytest.mark.skipif(not available(), reason="redis-server is not installed here")


def unix_time(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def inspect(d: Deployment) -> redis.Redis:
    """A plain client on the deployment's Redis, to look at what the API does not show (who runs what)."""
    return redis.Redis.from_url(d.env["SD_REDIS_URL"], decode_responses=True)


def job_field(d: Deployment, job_id: str, name: str) -> str | None:
    with inspect(d) as conn:
        found = conn.hget("{" + d.env["SD_REDIS_PREFIX"] + "}:job:" + job_id, name)
    return None if found is None else str(found)


def worker_running(d: Deployment, job_id: str) -> Any:
    """The worker process whose run the job is now."""
    name = job_field(d, job_id, "worker")
    return next(worker for worker in d.workers if worker.name == name)


def wait_steps(d: Deployment, job_id: str, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while len(d.steps_of(job_id)) < count:
        assert time.monotonic() < deadline, f"job {job_id} ran {len(d.steps_of(job_id))} steps"
        time.sleep(0.02)


def test_a_killed_workers_job_is_taken_over_once_its_lease_lapses(cluster: Deployer) -> None:
    d = cluster(fake={"step_delay": 0.05}, workers=2, worker_lease_seconds=LEASE, log_level="info")
    job = submit(d.client, prompt="survivor", seed=9, steps=40)
    wait_steps(d, job["id"], 3)
    victim = worker_running(d, job["id"])
    victim.kill(signal.SIGKILL)
    killed = time.time()
    body = wait_status(d.client, job["id"], {"succeeded"}, timeout=30)
    assert body["attempts"] == 2
    reclaim = unix_time(body["started_at"]) - killed
    assert reclaim <= LEASE + 1.0, f"taken over {reclaim:.2f} s after the kill"
    survivor = next(worker for worker in d.workers if worker is not victim)
    assert job_field(d, job["id"], "worker") == survivor.name
    samples = scrape(d.client)
    assert value(samples, "imagegen_fleet_jobs_reclaimed_total") == 1
    assert value(samples, "imagegen_fleet_lease_expiries_total") == 1
    image = d.client.get(f"/api/jobs/{job['id']}").json()["result"]["images"][0]
    assert image["seed"] == 9 and image["b64"]


def test_a_job_whose_worker_dies_too_often_fails_with_a_reason(cluster: Deployer) -> None:
    d = cluster(fake={"step_delay": 0.05}, worker_lease_seconds=LEASE, max_attempts=1, log_level="info")
    job = submit(d.client, prompt="unlucky", steps=100)
    wait_steps(d, job["id"], 2)
    d.workers[0].kill(signal.SIGKILL)
    body = wait_status(d.client, job["id"], {"failed"}, timeout=LEASE + 5)  # the replica reclaims too
    assert body["error"]["type"] == "generation_failed" and "SD_MAX_ATTEMPTS" in body["error"]["message"]
    assert value(scrape(d.client), "imagegen_fleet_jobs_failed_after_lease_total") == 1


def test_a_job_is_finalized_once_even_if_two_workers_ran_it(cluster: Deployer, receiver: tuple[Receiver, str]) -> None:
    hook, url = receiver
    d = cluster(
        fake={"step_delay": 0.05},
        workers=2,
        worker_lease_seconds=LEASE,
        webhook_backoff=0.05,
        webhook_allow_private=True,
        log_level="info",
    )
    job = submit(d.client, prompt="twice", seed=3, steps=60, callback_url=f"{url}/hook")
    events: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: events.extend(read_events(d.client, f"/api/jobs/{job['id']}/events")))
    reader.start()
    wait_steps(d, job["id"], 3)
    frozen = worker_running(d, job["id"])
    frozen.signal(signal.SIGSTOP)  # a stall longer than the lease: its job is taken over
    deadline = time.monotonic() + LEASE + 10
    while job_field(d, job["id"], "attempts") != "2" or job_field(d, job["id"], "status") != "running":
        assert time.monotonic() < deadline, "the frozen worker's job was not taken over"
        time.sleep(0.05)
    frozen.signal(signal.SIGCONT)  # it comes back, still believing the job is its own
    body = wait_status(d.client, job["id"], {"succeeded"}, timeout=30)
    reader.join(10)
    assert [event["event"] for event in events].count("succeeded") == 1
    assert body["attempts"] == 2
    deadline = time.monotonic() + 10
    while not hook.received:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    assert len(hook.received) == 1
    # One set of files: the frozen run stored nothing, or deleted what it stored.
    stored = {path.name for path in (d.folder / "outputs").glob("*.png")}
    assert stored == {image["filename"] for image in body["result"]["images"]}
    deadline = time.monotonic() + 5
    while "stops on this worker" not in frozen.log():  # it learnt that the job is no longer its own
        assert time.monotonic() < deadline, frozen.log()
        time.sleep(0.1)
    assert "succeeded" not in frozen.log()


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    hook = Receiver()
    with LiveServer(hook.app) as server:
        yield hook, server.url


def test_redis_restart_loses_no_accepted_job_and_the_api_says_503_meanwhile(tmp_path: Path, model_dir: Path) -> None:
    server = RedisServer(Path(tmp_path / "redis"), fsync="always").start()
    made = Deployer("redis", tmp_path / "cluster", model_dir, server.url)
    try:
        d = made(fake={"step_delay": 0.02}, workers=2, worker_lease_seconds=LEASE)
        accepted = [submit(d.client, prompt=f"keep {index}", seed=index, steps=5)["id"] for index in range(24)]
        wait_status(d.client, accepted[2], {"succeeded"})
        server.kill(signal.SIGKILL)
        started = time.monotonic()
        refused = d.client.post("/api/jobs", json={"prompt": "while down"})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "queue_unavailable"
        assert int(refused.headers["retry-after"]) >= 1
        read = d.client.get(f"/api/jobs/{accepted[-1]}")
        assert read.status_code == 503 and read.json()["error"]["type"] == "queue_unavailable"
        assert d.client.get("/api/jobs").status_code == 503
        health = d.client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "redis_unreachable"
        assert "Redis" in health.json()["reason"] and health.headers["retry-after"]
        assert time.monotonic() - started < 10, "answers while Redis is down must not hang"
        time.sleep(1.0)
        server.start()  # the same folder: the AOF brings every acknowledged admission back
        for job_id in accepted:
            assert wait_status(d.client, job_id, {"succeeded"}, timeout=60)["status"] == "succeeded"
        deadline = time.monotonic() + 10
        while d.client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        after = submit(d.client, prompt="after the restart", steps=2)
        assert wait_status(d.client, after["id"], {"succeeded"})["status"] == "succeeded"
    finally:
        made.close()
        server.kill()


def test_two_replicas_racing_never_exceed_the_queue_limit(cluster: Deployer) -> None:
    d = cluster(max_queue=5, worker_lease_seconds=LEASE)
    other = d.add_replica()
    d.workers[0].signal(signal.SIGSTOP)  # nothing runs: every admitted job stays queued
    try:

        async def hammer(base: str, label: str) -> list[int]:
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                answers = await asyncio.gather(
                    *(http.post("/api/jobs", json={"prompt": f"{label} {i}"}) for i in range(15))
                )
            return [answer.status_code for answer in answers]

        async def both() -> list[int]:
            first, second = await asyncio.gather(hammer(str(d.client.base_url), "a"), hammer(str(other.base_url), "b"))
            return first + second

        statuses = asyncio.run(both())
        assert statuses.count(202) == 5 and statuses.count(429) == 25
        assert len(d.client.get("/api/jobs", params={"status": "queued"}).json()["jobs"]) == 5
    finally:
        d.workers[0].signal(signal.SIGCONT)
    for job in d.client.get("/api/jobs").json()["jobs"]:
        wait_status(d.client, job["id"], {"succeeded"})


def test_cancel_on_one_replica_stops_the_worker_within_one_step(cluster: Deployer) -> None:
    d = cluster(fake={"step_delay": 0.1}, worker_lease_seconds=LEASE)
    other = d.add_replica()
    job = submit(d.client, prompt="stop me", steps=100)
    wait_steps(d, job["id"], 3)
    response = other.post(f"/api/jobs/{job['id']}/cancel")
    answered = time.time()
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    time.sleep(0.5)
    after = [step for step, at in d.steps_of(job["id"]) if at > answered]
    assert len(after) <= 1, after
    assert d.client.get(f"/api/jobs/{job['id']}").json()["status"] == "cancelled"


def test_sse_on_another_replica_shows_every_step(cluster: Deployer) -> None:
    d = cluster(fake={"step_delay": 0.02}, worker_lease_seconds=LEASE)
    other = d.add_replica()
    blocker = submit(d.client, prompt="blocker", steps=1000)
    wait_status(d.client, blocker["id"], {"running"})
    job = submit(d.client, prompt="watched elsewhere", steps=20)
    events: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: events.extend(read_events(other, f"/api/jobs/{job['id']}/events")))
    reader.start()
    time.sleep(0.5)
    d.client.post(f"/api/jobs/{blocker['id']}/cancel")
    reader.join(30)
    assert [event["data"]["step"] for event in events if event["event"] == "progress"] == list(range(1, 21))
    assert events[0]["event"] == "queued" and events[-1]["event"] == "succeeded"


def test_webhooks_are_delivered_once_whichever_replica(cluster: Deployer, receiver: tuple[Receiver, str]) -> None:
    hook, url = receiver
    d = cluster(worker_lease_seconds=LEASE, webhook_backoff=0.05, webhook_allow_private=True)
    other = d.add_replica()
    ids = [
        submit(client, prompt=f"hook {index}", steps=1, callback_url=f"{url}/hook")["id"]
        for index, client in enumerate([d.client, other] * 3)
    ]
    for job_id in ids:
        wait_status(d.client, job_id, {"succeeded"})
    deadline = time.monotonic() + 20
    while len(hook.received) < len(ids):
        assert time.monotonic() < deadline, len(hook.received)
        time.sleep(0.05)
    time.sleep(1.0)
    counts = collections.Counter(item["headers"]["x-imagegen-job-id"] for item in hook.received)
    assert counts == dict.fromkeys(ids, 1)


def test_every_replica_lists_every_job(cluster: Deployer) -> None:
    d = cluster(worker_lease_seconds=LEASE)
    other = d.add_replica()
    mine = [submit(d.client, prompt=f"here {index}", steps=1)["id"] for index in range(3)]
    theirs = [submit(other, prompt=f"there {index}", steps=1)["id"] for index in range(3)]
    for client in (d.client, other):
        listed = {job["id"] for job in client.get("/api/jobs").json()["jobs"]}
        assert set(mine + theirs) <= listed


def test_jobs_go_only_to_workers_serving_their_model(cluster: Deployer) -> None:
    d = cluster(fake={"models": ("fake-model", "fake-b")}, workers=0, worker_lease_seconds=LEASE)
    first = d.add_worker("--model", "fake-model")
    second = d.add_worker("--model", "fake-b")
    jobs = {
        model: [submit(d.client, model=model, steps=1)["id"] for _ in range(3)] for model in ("fake-model", "fake-b")
    }
    for model, worker in (("fake-model", first), ("fake-b", second)):
        for job_id in jobs[model]:
            wait_status(d.client, job_id, {"succeeded"})
            assert job_field(d, job_id, "worker") == worker.name
    second.stop()  # its model's jobs wait for it (or another worker of that model); the other never takes them
    waiting = submit(d.client, model="fake-b", steps=1)
    time.sleep(1.5)
    assert d.client.get(f"/api/jobs/{waiting['id']}").json()["status"] == "queued"
    d.add_worker("--model", "fake-b")
    assert wait_status(d.client, waiting["id"], {"succeeded"})["status"] == "succeeded"


def test_a_worker_stopping_gives_its_running_job_back(cluster: Deployer) -> None:
    d = cluster(fake={"step_delay": 0.05}, worker_lease_seconds=LEASE, shutdown_grace=0.3)
    job = submit(d.client, prompt="handed over", steps=100)
    wait_steps(d, job["id"], 2)
    first = d.workers[0]
    first.stop()  # SIGTERM: the batch gets 0.3 s, then the job goes back to its queue
    body = wait_status(d.client, job["id"], {"queued"}, timeout=10)
    assert body["attempts"] == 0  # given back: not counted
    deadline = time.monotonic() + 5
    while (health := d.client.get("/health")).status_code != 503:  # not live any more...
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert health.json()["backends"]["fake"]["state"] == "unavailable"
    assert "may come back" in health.json()["backends"]["fake"]["reason"]  # ...but not forgotten
    waiting = d.client.post("/api/jobs", json={"prompt": "meanwhile", "steps": 1})
    assert waiting.status_code == 202  # a worker that stopped may come back: jobs wait for it
    d.add_worker()
    assert wait_status(d.client, waiting.json()["id"], {"succeeded"})["status"] == "succeeded"
    assert wait_status(d.client, job["id"], {"succeeded"}, timeout=30)["attempts"] == 1
