"""The device rules on a worker of the cluster: `imagegen worker` builds its backends through the same
registry as the service, so its local backends run in a device process (SD_DEVICE_ISOLATION=process),
and a wedged pipeline call is answered at its deadline and ended by killing that process; the next job
runs on a fresh one (tests/support/fake_local.py: "wedge" sleeps in a step with no step callback)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from imagegen.config import Settings
from imagegen.main import create_app
from tests.support.cluster import unique_prefix
from tests.support.fake_local import FakeLocalBackend
from tests.support.process import WorkerProcess
from tests.support.redis_server import RedisServer
from tests.support.server import LiveServer, wait_ready


def wait_final(client: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/api/jobs/{job_id}", params={"include_images": "false"}).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def test_a_wedged_call_on_a_worker_is_answered_at_its_deadline_and_its_device_process_replaced(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    values: dict[str, Any] = {
        "redis_url": redis_server.url,
        "redis_prefix": unique_prefix(),
        "output_dir": tmp_path / "outputs",
        "data_dir": tmp_path / "data",
        "host": "127.0.0.1",
        "log_level": "warning",
        "job_timeout": 2,
        "device_stop_grace": 1,
    }
    env = {f"SD_{key.upper()}": str(value) for key, value in values.items()}
    worker = WorkerProcess(
        tmp_path,
        backends=("fake-local",),
        factories=("fake-local=tests.support.fake_local:FakeLocalBackend",),
        ready_timeout=120,
        **env,
    ).start()
    try:
        app = create_app(
            Settings(_env_file=None, **values),
            backend_factories={"fake-local": FakeLocalBackend},
            default_backend="fake-local",
        )
        with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
            wait_ready(client, timeout=120)
            sent = time.monotonic()
            wedged = client.post("/api/jobs", json={"prompt": "a wedge", "steps": 4}).json()
            behind = client.post("/api/jobs", json={"prompt": "a fox", "steps": 2}).json()
            failed = wait_final(client, wedged["id"])
            answered = time.monotonic() - sent
            assert failed["status"] == "failed" and failed["error"]["type"] == "deadline_exceeded", failed
            assert answered < 15  # 2 s from the device, not the 300 s the call would take
            done = wait_final(client, behind["id"])
            assert done["status"] == "succeeded", done
            assert time.monotonic() - sent < 40  # stop grace 1 s, a kill and a fresh device process
    finally:
        worker.stop()
    log = worker.log()
    assert "did not stop within" in log and "killing device process" in log, log[-3000:]
