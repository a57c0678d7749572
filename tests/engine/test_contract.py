"""The job engine contract: every test runs against both engines through the HTTP API
(`deploy` in tests/conftest.py): the embedded SQLite engine, and a Redis cluster whose worker runs in
its own process. Same fake backend, same settings, same expectations: admission, batching, priorities,
the global queue limit, cancel (queued, running: within one step), deadlines, failures, listing, SSE,
webhooks, disconnects, health and metrics."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.engine.test_webhooks import Receiver
from tests.support.cluster import Deployer, Deployment
from tests.support.fake_backend import expected_pixels, seed_of
from tests.support.scrape import delta, scrape, value
from tests.support.server import LiveServer
from tests.support.sse import read_events


def submit(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/api/jobs", json={"prompt": "a job", **body})
    assert response.status_code == 202, response.text
    accepted: dict[str, Any] = response.json()
    return accepted


def wait_status(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get(f"/api/jobs/{job_id}", params={"include_images": "false"}).json()
        if body["status"] in statuses:
            return body
        assert time.monotonic() < deadline, f"job {job_id} never reached {statuses}: {body}"
        time.sleep(0.02)


def block(deployment: Deployment, steps: int = 1000) -> dict[str, Any]:
    """A long job on the only slot, so that what is submitted next waits in the queue."""
    blocker = submit(deployment.client, prompt="blocker", steps=steps)
    wait_status(deployment.client, blocker["id"], {"running"})
    return blocker


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_a_job_from_submit_to_its_image(deploy: Deployer) -> None:
    d = deploy()
    accepted = submit(d.client, prompt="status please", seed=5, num_images=2, steps=4)
    assert accepted["status"] == "queued" and accepted["status_url"].endswith(accepted["id"])
    done = wait_status(d.client, accepted["id"], {"succeeded"})
    assert done["attempts"] == 1 and done["error"] is None and done["queue_position"] is None
    assert done["progress"] == {"step": 4, "total": 4, "fraction": 1.0, "eta_seconds": None}
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    full = d.client.get(f"/api/jobs/{accepted['id']}").json()
    for image, seed in zip(full["result"]["images"], (5, 6), strict=True):
        pixels = decode(image["b64"])
        assert image["seed"] == seed and seed_of(pixels) == seed
        assert pixels.tobytes() == expected_pixels("status please", seed, 64, 64).tobytes()
        served = d.client.get(image["url"].removeprefix(str(d.client.base_url)))
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"


def test_the_synchronous_route_answers_with_the_image(deploy: Deployer) -> None:
    d = deploy()
    response = d.client.post("/api/txt2img", json={"prompt": "a red fox", "seed": 42})
    assert response.status_code == 200, response.text
    (image,) = response.json()["images"]
    assert decode(image["b64"]).tobytes() == expected_pixels("a red fox", 42, 64, 64).tobytes()
    raw = d.client.post("/api/txt2img", json={"prompt": "raw", "seed": 7}, headers={"Accept": "image/png"})
    assert raw.status_code == 200 and raw.headers["x-seed"] == "7"
    assert Image.open(io.BytesIO(raw.content)).tobytes() == expected_pixels("raw", 7, 64, 64).tobytes()


def test_bad_input_is_refused_before_it_is_queued(deploy: Deployer) -> None:
    d = deploy()
    bad = d.client.post("/api/jobs", json={"prompt": "x", "width": 7})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "width"
    unknown = d.client.post("/api/jobs", json={"prompt": "x", "backend": "nope"})
    assert unknown.status_code == 422 and unknown.json()["error"]["param"] == "backend"
    assert d.client.get("/api/jobs").json()["jobs"] == []


def test_compatible_queued_jobs_share_one_call_exactly_as_batched(deploy: Deployer) -> None:
    d = deploy(max_batch=4)
    blocker = block(d)
    same = [submit(d.client, prompt=f"merge {index}", seed=index, steps=3) for index in range(3)]
    other_size = submit(d.client, prompt="alone", width=72, steps=3)
    two_images = submit(d.client, prompt="too many", num_images=2, steps=3)  # 3 + 2 > 4: not merged
    d.client.post(f"/api/jobs/{blocker['id']}/cancel")
    bodies = [wait_status(d.client, job["id"], {"succeeded"}) for job in (*same, other_size, two_images)]
    merged = bodies[:3]
    assert [body["result"]["timings"]["batch_size"] for body in merged] == [3, 3, 3]
    assert len({body["started_at"] for body in merged}) == 1
    assert bodies[3]["result"]["timings"]["batch_size"] == 1
    assert bodies[4]["result"]["timings"]["batch_size"] == 1
    # Each got the image it would have got alone.
    for index, body in enumerate(merged):
        image = d.client.get(f"/api/jobs/{body['id']}").json()["result"]["images"][0]
        assert decode(image["b64"]).tobytes() == expected_pixels(f"merge {index}", index, 64, 64).tobytes()


def test_higher_priority_runs_first(deploy: Deployer) -> None:
    d = deploy()
    blocker = block(d)
    # Different sizes: none of them can share a call.
    low = submit(d.client, prompt="low", priority=-5, width=64, steps=2)
    normal = submit(d.client, prompt="normal", width=72, steps=2)
    high = submit(d.client, prompt="high", priority=5, width=80, steps=2)
    assert d.client.get(f"/api/jobs/{high['id']}").json()["queue_position"] == 0
    assert d.client.get(f"/api/jobs/{low['id']}").json()["queue_position"] == 2
    d.client.post(f"/api/jobs/{blocker['id']}/cancel")
    started = {
        name: wait_status(d.client, job["id"], {"succeeded"})["started_at"]
        for name, job in (("low", low), ("normal", normal), ("high", high))
    }
    assert sorted(started, key=lambda name: started[name]) == ["high", "normal", "low"]


def test_the_queue_limit_holds_under_a_burst(deploy: Deployer) -> None:
    d = deploy(max_queue=3)
    blocker = block(d)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=str(d.client.base_url), timeout=30) as http:
            return await asyncio.gather(*(http.post("/api/jobs", json={"prompt": f"burst {i}"}) for i in range(7)))

    responses = asyncio.run(burst())
    assert sorted(response.status_code for response in responses) == [202] * 3 + [429] * 4
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["type"] == "queue_full"
    health = d.client.get("/health")
    assert health.status_code == 200 and health.json()["queue"]["queued"] == 3
    assert health.json()["queue"]["running"] == 1
    d.client.post(f"/api/jobs/{blocker['id']}/cancel")
    for response in responses:
        if response.status_code == 202:
            assert wait_status(d.client, response.json()["id"], {"succeeded"})["status"] == "succeeded"


def test_cancel_queued_unknown_and_finished_jobs(deploy: Deployer) -> None:
    d = deploy()
    blocker = block(d)
    queued = submit(d.client, prompt="never runs")
    cancelled = d.client.post(f"/api/jobs/{queued['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["error"]["type"] == "cancelled"
    assert d.client.delete(f"/api/jobs/{queued['id']}").json()["status"] == "cancelled"  # idempotent
    assert d.client.post(f"/api/jobs/{'0' * 32}/cancel").status_code == 404
    assert d.client.get(f"/api/jobs/{'0' * 32}").status_code == 404
    d.client.post(f"/api/jobs/{blocker['id']}/cancel")
    done = submit(d.client, steps=2)
    wait_status(d.client, done["id"], {"succeeded"})
    conflict = d.client.post(f"/api/jobs/{done['id']}/cancel")
    assert conflict.status_code == 409 and conflict.json()["error"]["type"] == "conflict"
    assert d.steps_of(queued["id"]) == []


def test_cancel_stops_a_running_job_within_one_step(deploy: Deployer) -> None:
    d = deploy(fake={"step_delay": 0.1})
    job = submit(d.client, prompt="long one", steps=100)
    deadline = time.monotonic() + 20
    while len(d.steps_of(job["id"])) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    response = d.client.post(f"/api/jobs/{job['id']}/cancel")
    answered = time.time()
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    behind = submit(d.client, prompt="runs next", steps=2)
    assert wait_status(d.client, behind["id"], {"succeeded"}, timeout=10)["status"] == "succeeded"
    after = [step for step, at in d.steps_of(job["id"]) if at > answered]
    assert len(after) <= 1, after  # the step in progress ends; no other starts
    final = d.client.get(f"/api/jobs/{job['id']}").json()
    assert final["status"] == "cancelled" and final["result"] is None


def test_the_deadline_fails_a_job_with_504(deploy: Deployer) -> None:
    d = deploy(job_timeout=0.5)
    started = time.monotonic()
    late = d.client.post("/api/txt2img", json={"prompt": "too long", "steps": 500})
    assert late.status_code == 504 and late.json()["error"]["type"] == "deadline_exceeded"
    assert time.monotonic() - started < 10
    assert d.client.post("/api/txt2img", json={"prompt": "fine", "steps": 2}).status_code == 200


def test_failures_and_flagged_images(deploy: Deployer) -> None:
    d = deploy()
    failed = d.client.post("/api/txt2img", json={"prompt": "fail please"})
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "generation_failed"
    oom = d.client.post("/api/txt2img", json={"prompt": "oom"})
    assert oom.status_code == 503 and oom.json()["error"]["type"] == "out_of_memory"
    flagged = submit(d.client, prompt="nsfw thing", num_images=2)
    body = wait_status(d.client, flagged["id"], {"succeeded"})
    assert [image["nsfw"] for image in body["result"]["images"]] == [True, True]
    assert all(image["url"] is None for image in body["result"]["images"])


def test_listing_newest_first_with_filters_and_pages(deploy: Deployer) -> None:
    d = deploy()
    ok = []
    for index in range(3):
        ok.append(submit(d.client, prompt=f"list {index}", steps=1)["id"])
        wait_status(d.client, ok[-1], {"succeeded"})
    failed = submit(d.client, prompt="fail please")["id"]
    wait_status(d.client, failed, {"failed"})
    listed = d.client.get("/api/jobs").json()["jobs"]
    assert [job["id"] for job in listed] == [failed, *reversed(ok)]
    only_failed = d.client.get("/api/jobs", params={"status": "failed"}).json()["jobs"]
    assert [job["id"] for job in only_failed] == [failed]
    assert d.client.get("/api/jobs", params={"backend": "sd"}).json()["jobs"] == []
    page = d.client.get("/api/jobs", params={"limit": 2}).json()
    assert [job["id"] for job in page["jobs"]] == [failed, ok[2]] and page["next_before"] is not None
    older = d.client.get("/api/jobs", params={"limit": 2, "before": page["next_before"]}).json()["jobs"]
    assert [job["id"] for job in older] == [ok[1], ok[0]]


def test_events_report_position_every_step_and_the_final_state(deploy: Deployer) -> None:
    d = deploy()
    blocker = block(d)
    job = submit(d.client, prompt="watched", steps=5)
    events: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: events.extend(read_events(d.client, f"/api/jobs/{job['id']}/events")))
    reader.start()
    time.sleep(0.3)
    d.client.post(f"/api/jobs/{blocker['id']}/cancel")
    reader.join(30)
    names = [event["event"] for event in events]
    assert names[0] == "queued" and events[0]["data"]["queue_position"] == 0
    assert [event["data"]["step"] for event in events if event["event"] == "progress"] == [1, 2, 3, 4, 5]
    assert names.index("running") < names.index("progress")
    assert names[-1] == "succeeded" and events[-1]["data"]["result"]["images"][0]["url"]
    replay = list(read_events(d.client, f"/api/jobs/{job['id']}/events"))
    assert [event["event"] for event in replay] == ["succeeded"]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    hook = Receiver()
    with LiveServer(hook.app) as server:
        yield hook, server.url


def test_a_webhook_is_delivered_once_and_signed(deploy: Deployer, receiver: tuple[Receiver, str]) -> None:
    hook, url = receiver
    # The receiver is on loopback: allowed explicitly (private targets are refused by default).
    d = deploy(webhook_secret="whsec-contract", webhook_backoff=0.05, webhook_allow_private=True)
    job = submit(d.client, prompt="call me", callback_url=f"{url}/hook", steps=2)
    deadline = time.monotonic() + 20
    while True:
        body = d.client.get(f"/api/jobs/{job['id']}", params={"include_images": "false"}).json()
        if body["webhook"] and body["webhook"]["status"] != "pending":
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    assert body["webhook"]["status"] == "delivered"
    time.sleep(0.5)  # a second delivery would have come by now
    assert len(hook.received) == 1
    received = hook.received[0]
    expected = "sha256=" + hmac.new(b"whsec-contract", received["body"], hashlib.sha256).hexdigest()
    assert received["headers"]["x-imagegen-signature"] == expected
    assert received["headers"]["x-imagegen-job-id"] == job["id"]


def test_a_caller_that_disconnects_cancels_its_synchronous_job(deploy: Deployer) -> None:
    d = deploy(fake={"step_delay": 0.05})
    host, port = d.client.base_url.host, d.client.base_url.port
    body = b'{"prompt": "abandoned", "steps": 150}'
    with socket.create_connection((host, port)) as raw:
        raw.sendall(
            b"POST /api/txt2img HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 10
        while not d.client.get("/api/jobs", params={"status": "running"}).json()["jobs"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    deadline = time.monotonic() + 10
    while not (jobs := d.client.get("/api/jobs", params={"status": "cancelled"}).json()["jobs"]):
        assert time.monotonic() < deadline, "the abandoned job kept running"
        time.sleep(0.05)
    assert jobs[0]["parameters"]["prompt"] == "abandoned"


def test_a1111_progress_and_interrupt_see_the_running_job(deploy: Deployer) -> None:
    d = deploy(fake={"step_delay": 0.05})
    job = submit(d.client, prompt="a1111 watched", steps=400)
    deadline = time.monotonic() + 10
    while (progress := d.client.get("/sdapi/v1/progress").json())["state"]["sampling_step"] < 2:
        assert time.monotonic() < deadline, progress
        time.sleep(0.05)
    assert progress["state"]["job"] == job["id"] and progress["state"]["sampling_steps"] == 400
    assert 0 < progress["progress"] < 1 and progress["state"]["job_count"] == 1
    assert d.client.post("/sdapi/v1/interrupt").status_code == 200
    assert wait_status(d.client, job["id"], {"cancelled"})["status"] == "cancelled"


def test_health_backends_and_metrics(deploy: Deployer) -> None:
    d = deploy()
    health = d.client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["backends"]["fake"]["state"] == "ready"
    listed = {backend["id"]: backend for backend in d.client.get("/api/backends").json()["backends"]}
    assert listed["fake"]["state"] == "ready" and listed["fake"]["capabilities"]["models"] == ["fake-model"]
    before = scrape(d.client)
    job = submit(d.client, steps=1)
    wait_status(d.client, job["id"], {"succeeded"})
    deadline = time.monotonic() + 5  # counted once its final event reached the replica that admitted it
    while delta(before, after := scrape(d.client), "imagegen_jobs_total", backend="fake", status="succeeded") != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert value(after, "imagegen_queue_depth", lane="fake") == 0
    if d.kind == "redis":
        assert value(after, "imagegen_workers_live", backend="fake") == 1
        assert ("imagegen_queue_depth_by_model", frozenset({("backend", "fake"), ("model", "fake-model")})) in after
        assert value(after, "imagegen_redis_up") == 1
        assert ("imagegen_fleet_jobs_reclaimed_total", frozenset()) in after
        assert health.json()["mode"] == "distributed" and health.json()["redis"]["state"] == "ok"
    else:
        assert ("imagegen_redis_up", frozenset()) not in after and "mode" not in health.json()


def test_the_openai_dialect_goes_through_the_engine(deploy: Deployer) -> None:
    d = deploy()
    models = [model["id"] for model in d.client.get("/v1/models").json()["data"]]
    assert "fake" in models
    answer = d.client.post(
        "/v1/images/generations",
        json={"prompt": "an openai fox", "model": "fake", "size": "64x64", "response_format": "b64_json"},
    )
    assert answer.status_code == 200, answer.text
    (image,) = answer.json()["data"]
    assert decode(image["b64_json"]).size == (64, 64)
    assert d.client.get("/api/jobs").json()["jobs"][0]["parameters"]["prompt"] == "an openai fox"
