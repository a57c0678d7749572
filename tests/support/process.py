"""The real service (fake backend as default) in its own process, for tests that kill it for real:
start, SIGKILL/SIGTERM, restart on the same data folder."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

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
            SD_DATA_DIR=str(tmp / "data"),
            SD_OUTPUT_DIR=str(tmp / "outputs"),
            SD_MODEL_DIR=str(tmp / "models"),
            SD_LOG_LEVEL="warning",
            PYTHONPATH=str(ROOT),
            **env,
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.client: httpx.Client | None = None

    def start(self) -> httpx.Client:
        port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.serve_fake", "--port", str(port)],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / "server.log", "ab"),
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
