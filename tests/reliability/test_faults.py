"""Faults: repeated out-of-memory, a hanging backend, a backend that dies, and SIGKILL during a long
queue. Each test names the peer failure it guards against (issue threads of peer projects)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_backend import FakeBackend
from tests.support.process import db_statuses, wait_until


@pytest.fixture
def two_fakes(serve: Callable[..., httpx.Client]) -> Callable[..., tuple[httpx.Client, dict[str, FakeBackend]]]:
    """A service with two fake backends on separate lanes ("fake" the default, "other")."""

    def start(**settings: Any) -> tuple[httpx.Client, dict[str, FakeBackend]]:
        made: dict[str, FakeBackend] = {}

        def factory(backend_id: str) -> Callable[[Any], FakeBackend]:
            def build(s: Any) -> FakeBackend:
                made[backend_id] = FakeBackend(s, backend_id=backend_id, lane=backend_id)
                return made[backend_id]

            return build

        client = serve(
            factories={"fake": factory("fake"), "other": factory("other")}, default_backend="fake", **settings
        )
        return client, made

    return start


def test_fifty_out_of_memory_errors_in_a_row_leave_the_service_ready(two_fakes) -> None:
    """A1111 #3280/#11970, SD.Next #777, InvokeAI #1036: after a CUDA OOM the server hung or kept
    failing. Each OOM must be a 503 with a clear error, and the very next good request must work."""
    client, _ = two_fakes()
    for index in range(50):
        oom = client.post("/api/txt2img", json={"prompt": f"oom {index}", "seed": index})
        assert oom.status_code == 503
        error = oom.json()["error"]
        assert error["type"] == "out_of_memory" and "reduce" in error["message"]
        assert client.get("/health").status_code == 200
        if index % 5 == 4:
            good = client.post("/api/txt2img", json={"prompt": f"fine {index}", "seed": index})
            assert good.status_code == 200 and good.json()["images"][0]["seed"] == index
    assert client.post("/api/txt2img", json={"prompt": "after all that"}).status_code == 200


def test_a_hanging_backend_hits_the_deadline_and_frees_the_worker(two_fakes) -> None:
    """A1111 #11630: generation hangs forever. 504 at the deadline, and the lane serves again."""
    client, _ = two_fakes(job_timeout=0.5)
    started = time.monotonic()
    for _ in range(3):
        hung = client.post("/api/txt2img", json={"prompt": "hang"})
        assert hung.status_code == 504 and hung.json()["error"]["type"] == "deadline_exceeded"
    assert time.monotonic() - started < 10
    assert client.post("/api/txt2img", json={"prompt": "fine"}).status_code == 200


def test_a_backend_that_fails_fatally_shows_in_health_and_the_others_keep_serving(two_fakes) -> None:
    """A dead device must not take the service down: health names the broken backend, requests to
    it fail fast with 503, the other backends keep serving."""
    client, _fakes = two_fakes()
    dead = client.post("/api/txt2img", json={"prompt": "fatal"})
    assert dead.status_code == 503 and dead.json()["error"]["type"] == "backend_unavailable"
    health = client.get("/health")
    assert health.status_code == 503  # the default backend is the broken one
    assert health.json()["backends"]["fake"]["state"] == "error"
    assert health.json()["backends"]["other"]["state"] == "ready"
    assert client.post("/api/txt2img", json={"prompt": "again"}).status_code == 503
    for index in range(5):
        ok = client.post("/api/txt2img", json={"prompt": f"elsewhere {index}", "backend": "other", "seed": index})
        assert ok.status_code == 200 and ok.json()["backend"] == "other"
    assert client.get("/health/live").status_code == 200


@pytest.mark.slow
def test_sigkill_during_a_run_of_100_queued_jobs(service, tmp_path: Path) -> None:
    """ComfyUI #13512/#2844: the queue was lost on restart. 100 accepted jobs, a SIGKILL in the
    middle of the run, a restart: every job final, none lost, none run twice to success."""
    first = service(FAKE_STEP_DELAY="0.01", SD_MAX_BATCH="1", SD_MAX_QUEUE="200")
    client = first.start()
    ids = [client.post("/api/jobs", json={"prompt": f"job {i}", "seed": i}).json()["id"] for i in range(100)]
    deadline = time.monotonic() + 30
    while sum(status == "succeeded" for status in db_statuses(tmp_path).values()) < 10:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    first.kill(signal.SIGKILL)
    before = db_statuses(tmp_path)
    assert 10 <= sum(status == "succeeded" for status in before.values()) < 100

    client = service(FAKE_STEP_DELAY="0.001", SD_MAX_QUEUE="200").start()
    finals = {job_id: wait_until(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=60) for job_id in ids}
    assert {body["status"] for body in finals.values()} == {"succeeded"}
    for job_id, body in finals.items():
        assert body["attempts"] <= 2
        if before[job_id] == "succeeded":
            assert body["attempts"] == 1  # finished before the kill: never run again
    files = [p for p in (tmp_path / "outputs").iterdir() if not p.name.startswith(".")]
    assert len(files) == 100  # one image per job: nothing ran twice to success
    assert {body["result"]["images"][0]["seed"] for body in finals.values()} == set(range(100))
