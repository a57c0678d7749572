"""Persistence across real process deaths: SIGKILL mid-run, restart, every accepted job final; an
interrupted job retried a bounded number of times then failed (no poison loop); SIGTERM drains.

Threats: ComfyUI #13512/#2844 (queue lost on restart), #859 (a crashing job re-runs forever)."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServiceProcess:
    def __init__(self, tmp: Path, **env: str) -> None:
        self.tmp = tmp
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SD_")}
        self.env.update(
            SD_DATA_DIR=str(tmp / "data"), SD_OUTPUT_DIR=str(tmp / "outputs"), SD_MODEL_DIR=str(tmp / "models"),
            SD_LOG_LEVEL="warning", PYTHONPATH=str(ROOT), **env,
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.client: httpx.Client | None = None

    def start(self) -> httpx.Client:
        port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.serve_fake", "--port", str(port)],
            cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=open(self.tmp / "server.log", "ab"),
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.client.get("/health").status_code == 200:
                    return self.client
            except httpx.TransportError:
                pass
            assert self.process.poll() is None, (self.tmp / "server.log").read_text()
            assert time.monotonic() < deadline, "service did not start"
            time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout)
        if self.client is not None:
            self.client.close()
        return code


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Any]:
    made: list[ServiceProcess] = []

    def make(**env: str) -> ServiceProcess:
        made.append(ServiceProcess(tmp_path, **env))
        return made[-1]

    yield make
    for proc in made:
        if proc.process is not None and proc.process.poll() is None:
            proc.process.kill()
            proc.process.wait()


def wait_until(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/api/jobs/{job_id}").json()
        if body["status"] in statuses:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def db_statuses(tmp: Path) -> dict[str, str]:
    with sqlite3.connect(tmp / "data" / "jobs.sqlite3") as conn:
        return dict(conn.execute("SELECT id, status FROM jobs").fetchall())


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
