"""The job engine through its HTTP API, with the deterministic fake backend: concurrency without lost
or swapped results, the bounded queue, cancel, deadlines, priorities, SSE order, disconnects."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.support.fake_backend import expected_pixels, seed_of
from tests.support.sse import read_events


@pytest.fixture
def fake_client(serve: Callable[..., httpx.Client], fake_factory) -> Callable[..., tuple[httpx.Client, Any]]:
    def start(fake_options: dict[str, Any] | None = None, **settings: Any) -> tuple[httpx.Client, Any]:
        factories, holder = fake_factory(**(fake_options or {}))
        client = serve(factories=factories, default_backend="fake", **settings)
        return client, holder["backend"]

    return start


def wait_status(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/api/jobs/{job_id}").json()
        if body["status"] in statuses:
            return body
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {statuses}: {body}")


def submit(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/api/jobs", json={"prompt": "a job", **body})
    assert response.status_code == 202, response.text
    return response.json()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_64_concurrent_clients_each_get_their_own_image(fake_client) -> None:
    client, fake = fake_client({"max_batch": 8})

    async def one(http: httpx.AsyncClient, index: int) -> tuple[int, str, dict[str, Any]]:
        prompt = f"client {index}"
        response = await http.post("/api/txt2img", json={"prompt": prompt, "seed": 1000 + index})
        assert response.status_code == 200, response.text
        return index, prompt, response.json()

    async def run() -> list[tuple[int, str, dict[str, Any]]]:
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=60) as http:
            return await asyncio.gather(*(one(http, index) for index in range(64)))

    results = asyncio.run(run())
    assert len(results) == 64
    for index, prompt, body in results:
        (image,) = body["images"]
        assert image["seed"] == 1000 + index
        pixels = decode(image["b64"])
        assert seed_of(pixels) == 1000 + index, "an image reached the wrong client"
        assert pixels.tobytes() == expected_pixels(prompt, 1000 + index, 64, 64).tobytes()
    assert len({body["id"] for _, _, body in results}) == 64
    # Compatible requests were merged into batched calls.
    assert max(len(call) for call in fake.calls) > 1
    assert sum(len(call) for call in fake.calls) == 64


def test_burst_past_the_queue_limit_gets_exactly_the_excess_as_429(fake_client) -> None:
    client, fake = fake_client(max_queue=5)
    blocker = submit(client, prompt="hang")  # occupies the only worker
    wait_status(client, blocker["id"], {"running"})

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=30) as http:
            return await asyncio.gather(*(http.post("/api/jobs", json={"prompt": f"burst {i}"}) for i in range(9)))

    responses = asyncio.run(burst())
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [202] * 5 + [429] * 4
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["type"] == "queue_full"
    # /health still answers at once while the queue is full.
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["queue"]["queued"] == 5
    fake.release()
    for response in responses:
        if response.status_code == 202:
            assert wait_status(client, response.json()["id"], {"succeeded"})["status"] == "succeeded"


def test_job_lifecycle_body_and_links(fake_client) -> None:
    client, _ = fake_client()
    accepted = client.post("/api/jobs", json={"prompt": "status please", "seed": 5, "num_images": 2})
    assert accepted.status_code == 202
    body = accepted.json()
    assert accepted.headers["location"] == body["status_url"]
    assert body["status_url"].endswith(f"/api/jobs/{body['id']}")
    assert body["events_url"].endswith(f"/api/jobs/{body['id']}/events")
    done = wait_status(client, body["id"], {"succeeded"})
    assert done["progress"] == {"step": 4, "total": 4, "fraction": 1.0, "eta_seconds": None}  # no ETA once done
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    assert [image["seed"] for image in done["result"]["images"]] == [5, 6]
    assert all(image["b64"] for image in done["result"]["images"])
    assert done["error"] is None and done["attempts"] == 1 and done["queue_position"] is None
    light = client.get(f"/api/jobs/{body['id']}", params={"include_images": "false"}).json()
    assert all(image["b64"] is None and image["url"] for image in light["result"]["images"])


@pytest.mark.parametrize("public_url", [None, "https://images.example.org/gen"])
def test_links_never_reflect_the_host_header(fake_client, public_url: str | None) -> None:
    """A Host header (any caller, or a proxy passing one on) must not decide where links point."""
    client, _ = fake_client(public_url=public_url)
    evil = {"Host": "evil.example:666", "X-Forwarded-Host": "evil.example"}
    accepted = client.post("/api/jobs", json={"prompt": "links", "seed": 1}, headers=evil)
    assert accepted.status_code == 202
    body = accepted.json()
    base = public_url or ""
    assert body["status_url"] == f"{base}/api/jobs/{body['id']}"
    assert body["events_url"] == f"{base}/api/jobs/{body['id']}/events"
    assert accepted.headers["location"] == body["status_url"]
    done = wait_status(client, body["id"], {"succeeded"})
    image = client.get(f"/api/jobs/{body['id']}", headers=evil).json()["result"]["images"][0]
    assert (
        image["url"]
        == f"{base}/api/images/{image['filename']}"
        == f"{base}/api/images/{done['result']['images'][0]['filename']}"
    )
    sync = client.post("/api/txt2img", json={"prompt": "links"}, headers=evil).json()["images"][0]
    assert sync["url"] == f"{base}/api/images/{sync['filename']}"
    listed = client.get("/api/images", headers=evil).json()["images"]
    assert listed and all(item["url"].startswith(f"{base}/api/images/") for item in listed)
    for answer in (accepted.text, client.get(f"/api/jobs/{body['id']}", headers=evil).text):
        assert "evil.example" not in answer


def test_listing_with_filters(fake_client) -> None:
    client, _ = fake_client()
    ok = [submit(client, prompt=f"list {i}")["id"] for i in range(3)]
    failed = submit(client, prompt="fail please")["id"]
    for job_id in ok:
        wait_status(client, job_id, {"succeeded"})
    wait_status(client, failed, {"failed"})
    listed = client.get("/api/jobs").json()["jobs"]
    assert [job["id"] for job in listed[:4]] == [failed, *reversed(ok)]  # newest first
    only_failed = client.get("/api/jobs", params={"status": "failed"}).json()["jobs"]
    assert [job["id"] for job in only_failed] == [failed]
    assert only_failed[0]["error"]["type"] == "generation_failed"
    page = client.get("/api/jobs", params={"limit": 2}).json()
    assert len(page["jobs"]) == 2 and page["next_before"] is not None
    older = client.get("/api/jobs", params={"limit": 2, "before": page["next_before"]}).json()["jobs"]
    assert {job["id"] for job in older}.isdisjoint({job["id"] for job in page["jobs"]})
    assert client.get("/api/jobs", params={"status": "bogus"}).status_code == 422


def test_listing_by_prompt_text(fake_client) -> None:
    """The gallery's filter: jobs whose prompt contains the text, in any case; the text is never a pattern."""
    client, _ = fake_client()
    prompts = ["A Red Fox", "a blue ÄPFEL", "100% red", "snake_case", "plain"]
    ids = {prompt: submit(client, prompt=prompt)["id"] for prompt in prompts}
    for job_id in ids.values():
        wait_status(client, job_id, {"succeeded"})

    def found(text: str) -> list[str]:
        jobs = client.get("/api/jobs", params={"prompt": text, "status": "succeeded"}).json()["jobs"]
        return sorted(job["parameters"]["prompt"] for job in jobs)

    assert found("red") == ["100% red", "A Red Fox"]
    assert found("äpfel") == ["a blue ÄPFEL"]
    assert found("%") == ["100% red"] and found("_") == ["snake_case"] and found("e_c") == ["snake_case"]
    assert found("r_d") == [] and found("%red") == []
    assert client.get("/api/jobs", params={"prompt": ""}).status_code == 422
    assert client.get("/api/jobs", params={"prompt": "x" * 201}).status_code == 422


def test_cancel_a_queued_job_at_once(fake_client) -> None:
    client, fake = fake_client()
    blocker = submit(client, prompt="hang")
    wait_status(client, blocker["id"], {"running"})
    queued = submit(client, prompt="never runs")
    assert client.get(f"/api/jobs/{queued['id']}").json()["queue_position"] == 0
    cancelled = client.post(f"/api/jobs/{queued['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert client.post(f"/api/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"  # idempotent
    fake.release()
    wait_status(client, blocker["id"], {"succeeded"})
    assert all(request.prompt != "never runs" for call in fake.calls for request in call)


def test_cancel_a_running_job_between_steps(fake_client) -> None:
    client, _fake = fake_client({"step_delay": 0.05, "default_steps": 100})
    running = submit(client, prompt="long one")
    wait_status(client, running["id"], {"running"})
    behind = submit(client, prompt="runs next", steps=2)
    time.sleep(0.2)
    response = client.delete(f"/api/jobs/{running['id']}")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    # The worker stops between steps and moves on: the next job runs long before 100 steps would end.
    assert wait_status(client, behind["id"], {"succeeded"}, timeout=5)["status"] == "succeeded"
    final = client.get(f"/api/jobs/{running['id']}").json()
    assert final["status"] == "cancelled" and final["result"] is None
    assert final["progress"]["step"] < 100
    assert final["error"]["type"] == "cancelled"


def test_cancel_unknown_and_finished_jobs(fake_client) -> None:
    client, _ = fake_client()
    assert client.post(f"/api/jobs/{'0' * 32}/cancel").status_code == 404
    assert client.get(f"/api/jobs/{'0' * 32}").status_code == 404
    assert client.get("/api/jobs/not-a-job-id").status_code == 404
    done = submit(client)
    wait_status(client, done["id"], {"succeeded"})
    conflict = client.post(f"/api/jobs/{done['id']}/cancel")
    assert conflict.status_code == 409 and conflict.json()["error"]["type"] == "conflict"


def test_deadline_fails_with_504_and_the_worker_moves_on(fake_client) -> None:
    client, _ = fake_client(job_timeout=0.5)
    started = time.monotonic()
    hung = client.post("/api/txt2img", json={"prompt": "hang forever"})
    assert hung.status_code == 504
    assert hung.json()["error"]["type"] == "deadline_exceeded"
    assert time.monotonic() - started < 5
    after = client.post("/api/txt2img", json={"prompt": "fine", "seed": 2})
    assert after.status_code == 200


def test_higher_priority_runs_first(fake_client) -> None:
    client, fake = fake_client()
    blocker = submit(client, prompt="hang")
    wait_status(client, blocker["id"], {"running"})
    low = submit(client, prompt="low", priority=-5, steps=2)
    normal = submit(client, prompt="normal", steps=3)
    high = submit(client, prompt="high", priority=5, steps=5)
    assert client.get(f"/api/jobs/{high['id']}").json()["queue_position"] == 0
    assert client.get(f"/api/jobs/{low['id']}").json()["queue_position"] == 2
    fake.release()
    for job in (low, normal, high):
        wait_status(client, job["id"], {"succeeded"})
    order = [call[0].prompt for call in fake.calls[1:]]
    assert order == ["high", "normal", "low"]


def test_sse_stream_reports_queue_position_steps_and_final_state(fake_client) -> None:
    client, fake = fake_client({"step_delay": 0.02})
    blocker = submit(client, prompt="hang")
    wait_status(client, blocker["id"], {"running"})
    job = submit(client, prompt="watched", steps=5)
    events: list[dict[str, Any]] = []

    import threading

    reader = threading.Thread(target=lambda: events.extend(read_events(client, f"/api/jobs/{job['id']}/events")))
    reader.start()
    time.sleep(0.3)
    fake.release()
    reader.join(30)
    names = [event["event"] for event in events]
    assert names[0] == "queued" and events[0]["data"]["queue_position"] == 0
    assert "running" in names
    progress = [event["data"]["step"] for event in events if event["event"] == "progress"]
    assert progress == [1, 2, 3, 4, 5]
    assert names.index("running") < names.index("progress")
    assert names[-1] == "succeeded"
    final = events[-1]["data"]
    assert final["status"] == "succeeded" and final["result"]["images"][0]["url"]
    ids = [int(event["id"]) for event in events if "id" in event]
    assert ids == sorted(ids)
    # A finished job's stream is its final event alone.
    replay = list(read_events(client, f"/api/jobs/{job['id']}/events"))
    assert [event["event"] for event in replay] == ["succeeded"]


def test_out_of_memory_is_503_and_the_next_request_succeeds(fake_client) -> None:
    client, _ = fake_client()
    for _ in range(3):
        oom = client.post("/api/txt2img", json={"prompt": "oom"})
        assert oom.status_code == 503 and oom.json()["error"]["type"] == "out_of_memory"
        assert client.post("/api/txt2img", json={"prompt": "fine"}).status_code == 200
    assert client.get("/health").status_code == 200


def test_a_backend_bug_fails_the_job_not_the_service(fake_client) -> None:
    client, _ = fake_client()
    crash = client.post("/api/txt2img", json={"prompt": "crash"})
    assert crash.status_code == 500
    assert crash.json()["error"]["type"] == "generation_failed"
    assert "bug" not in crash.json()["error"]["message"]  # internals stay in the log
    assert client.post("/api/txt2img", json={"prompt": "fine"}).status_code == 200


def test_client_disconnect_cancels_its_synchronous_job(fake_client) -> None:
    client, _fake = fake_client({"step_delay": 0.05, "default_steps": 150})
    host, port = client.base_url.host, client.base_url.port
    body = b'{"prompt": "abandoned"}'
    with socket.create_connection((host, port)) as raw:
        raw.sendall(
            b"POST /api/txt2img HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 10
        while not client.get("/api/jobs", params={"status": "running"}).json()["jobs"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    # The socket is closed: the job must end as cancelled long before its 7.5 s of steps.
    deadline = time.monotonic() + 10
    while True:
        jobs = client.get("/api/jobs", params={"status": "cancelled"}).json()["jobs"]
        if jobs:
            break
        assert time.monotonic() < deadline, "the abandoned job kept running"
        time.sleep(0.05)
    assert jobs[0]["parameters"]["prompt"] == "abandoned"
    assert client.post("/api/txt2img", json={"prompt": "next", "steps": 2}).status_code == 200


def test_a_caller_that_goes_away_is_logged_499_not_409(fake_client) -> None:
    """Nobody reads the answer of a caller that disconnected: the log and the metrics say 499 (client
    closed request), neither a conflict nor a warning."""
    from tests.ops.test_logs import capture_service_log, wait_for

    client, _fake = fake_client({"step_delay": 0.05, "default_steps": 150}, log_level="info")
    log = capture_service_log(client)
    host, port = client.base_url.host, client.base_url.port
    body = b'{"prompt": "gone"}'
    with socket.create_connection((host, port)) as raw:
        raw.sendall(
            b"POST /api/txt2img HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 10
        while not client.get("/api/jobs", params={"status": "running"}).json()["jobs"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    text = wait_for(log, "POST /api/txt2img 499")
    assert "POST /api/txt2img 409" not in text and "WARNING" not in text
    metrics = client.get("/metrics").text
    assert 'route="/api/txt2img",status="499"' in metrics
    assert 'route="/api/txt2img",status="409"' not in metrics


def test_draining_refuses_new_jobs(fake_client) -> None:
    client, _ = fake_client()
    client.app.state.services.engine.begin_drain()  # type: ignore[attr-defined]
    response = client.post("/api/jobs", json={"prompt": "late"})
    assert response.status_code == 503 and response.json()["error"]["type"] == "shutting_down"
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "draining"
