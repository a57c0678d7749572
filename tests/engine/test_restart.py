"""Persistence across real process deaths: SIGKILL mid-run, restart, every accepted job final; an
interrupted job retried a bounded number of times then failed (no poison loop); SIGTERM drains.

Threats: ComfyUI #13512/#2844 (queue lost on restart), #859 (a crashing job re-runs forever)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.support.process import db_statuses, wait_until

pytestmark = pytest.mark.slow


def test_sigkill_mid_run_loses_nothing_and_runs_nothing_twice(service, tmp_path: Path) -> None:
    first = service(FAKE_STEP_DELAY="0.05", SD_MAX_ATTEMPTS="3", SD_MAX_BATCH="1")
    client = first.start()
    running = client.post("/api/jobs", json={"prompt": "slow running one", "steps": 20}).json()["id"]
    wait_until(client, running, {"running"})
    queued = [client.post("/api/jobs", json={"prompt": f"queued {i}", "seed": i}).json()["id"] for i in range(30)]
    first.kill(signal.SIGKILL)
    statuses = db_statuses(tmp_path)
    assert statuses[running] == "running"
    assert all(statuses[job_id] in ("queued", "running", "succeeded") for job_id in queued)

    client = service(FAKE_STEP_DELAY="0.001", SD_MAX_ATTEMPTS="3").start()
    everything = [running, *queued]
    finals = {job_id: wait_until(client, job_id, {"succeeded", "failed", "cancelled"}) for job_id in everything}
    assert {body["status"] for body in finals.values()} == {"succeeded"}
    assert finals[running]["attempts"] == 2  # interrupted once, retried once
    # None run twice to success: exactly one stored image per job.
    files = [p for p in (tmp_path / "outputs").iterdir() if not p.name.startswith(".")]
    assert len(files) == len(everything)
    assert {body["result"]["images"][0]["filename"] for body in finals.values()} == {p.name for p in files}


def test_a_job_that_keeps_dying_fails_after_max_attempts(service, tmp_path: Path) -> None:
    env = {"FAKE_STEP_DELAY": "0.01", "SD_MAX_ATTEMPTS": "2"}
    proc = service(**env)
    client = proc.start()
    poison = client.post("/api/jobs", json={"prompt": "hang: kills the process every time"}).json()["id"]
    for attempt in (1, 2):
        body = wait_until(client, poison, {"running"})
        assert body["attempts"] == attempt
        proc.kill(signal.SIGKILL)
        proc = service(**env)
        client = proc.start()
    final = wait_until(client, poison, {"failed"})
    assert final["attempts"] == 2
    assert final["error"]["type"] == "generation_failed"
    assert "SD_MAX_ATTEMPTS" in final["error"]["message"]
    # The service is healthy and serving after giving up on the poison job.
    assert client.post("/api/txt2img", json={"prompt": "after"}).status_code == 200


def test_sigterm_finishes_running_jobs_and_keeps_queued_ones(service, tmp_path: Path) -> None:
    proc = service(FAKE_STEP_DELAY="0.1", SD_SHUTDOWN_GRACE="20", SD_MAX_BATCH="1")
    client = proc.start()
    running = client.post("/api/jobs", json={"prompt": "finishing", "steps": 10}).json()["id"]
    wait_until(client, running, {"running"})
    queued = [client.post("/api/jobs", json={"prompt": f"later {i}", "steps": 10}).json()["id"] for i in range(3)]
    started = time.monotonic()
    # uvicorn re-raises the signal once it has shut down gracefully: killed by SIGTERM, after the drain.
    assert proc.kill(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 20
    statuses = db_statuses(tmp_path)
    assert statuses[running] == "succeeded"
    assert [statuses[job_id] for job_id in queued] == ["queued"] * 3

    client = service(FAKE_STEP_DELAY="0.001").start()
    for job_id in queued:
        assert wait_until(client, job_id, {"succeeded"})["attempts"] == 1
