"""A server in its own process on a free loopback port: started, waited for until healthy, stopped or
killed for real, its log read. One launcher for the tests (restart and signal tests kill the service
for real) and the benchmarks (bench/ runs the service the way an operator does).

Plain Python, no pytest: bench/ imports it too.

    ServiceProcess(folder)                        # the real app, the fake backend as default (serve_fake)
    ServiceProcess(folder, command=SERVE, ...)    # `imagegen serve`, as an operator starts it
    ServiceProcess(folder, command=FAKE_BFL, health="/v1/credits", headers={"x-key": key})
    WorkerProcess(folder, SD_REDIS_URL=url)       # `imagegen worker` of a cluster, the fake backend by default
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]

#: `imagegen serve`: the real service with the settings from SD_* variables.
SERVE = ("-m", "imagegen.cli", "serve")
#: The real app with the deterministic fake backend as default (FAKE_STEP_DELAY: its per-step delay).
SERVE_FAKE = ("-m", "tests.support.serve_fake")
#: The fake BFL API (tests/support/fake_bfl.py); add its options after it.
FAKE_BFL = ("-m", "tests.support.fake_bfl")
#: `imagegen worker` (a cluster's worker: docs/scale-out.md); add its options after it.
WORKER = ("-m", "imagegen.cli", "worker")
#: The fake backend for a worker process (FAKE_STEP_DELAY and friends: tests/support/fake_backend.py).
FAKE_FACTORY = "fake=tests.support.fake_backend:from_env"


def service_env(folder: Path, env: dict[str, str]) -> dict[str, str]:
    """This process's environment without its SD_* variables, the service's folders under `folder`,
    the checkout's code first on the path, then `env`."""
    result = {key: value for key, value in os.environ.items() if not key.startswith("SD_")}
    result.update(
        SD_HOST="127.0.0.1",
        SD_DATA_DIR=str(folder / "data"),
        SD_OUTPUT_DIR=str(folder / "outputs"),
        SD_MODEL_DIR=str(folder / "models"),
        SD_LOG_LEVEL="warning",
        HF_HUB_OFFLINE="1",
        # The checkout's code (and tests.support) wins over any installed copy.
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    result.update(env)
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ServiceProcess:
    """`python <command> --port N` in `folder` (a fresh temporary folder if None), with the SD_*
    variables of this process dropped and the service's folders under `folder` unless `env` says
    otherwise. Each start takes a new free port; stderr goes to `folder`/server.log."""

    def __init__(
        self,
        folder: Path | None = None,
        *,
        command: Sequence[str] = SERVE_FAKE,
        health: str = "/health",
        headers: dict[str, str] | None = None,
        ready_timeout: float = 60.0,
        **env: str,
    ) -> None:
        self.tmp = folder if folder is not None else Path(tempfile.mkdtemp(prefix="imagegen-service-"))
        self.command = tuple(command)
        self.health = health
        self.headers = headers or {}
        self.ready_timeout = ready_timeout
        self.env = service_env(self.tmp, env)
        self.log_path = self.tmp / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.client: httpx.Client | None = None
        self.port = 0
        self.url = ""
        #: seconds from the start of the process to its first healthy answer
        self.ready_seconds = 0.0

    def start(self) -> httpx.Client:
        """Start and wait until `health` answers 200; a client for it (with `headers`)."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, *self.command, "--port", str(self.port)],
                cwd=self.tmp,  # never a checkout's .env
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self.client = httpx.Client(base_url=self.url, headers=self.headers, timeout=30)
        deadline = time.monotonic() + self.ready_timeout
        while True:
            try:
                if self.client.get(self.health, timeout=5).status_code == 200:
                    self.ready_seconds = time.perf_counter() - started
                    return self.client
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                self.client.close()
                raise RuntimeError(f"{' '.join(self.command)} exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{' '.join(self.command)} was not healthy after {self.ready_timeout:g} s")
            time.sleep(0.02)

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30) -> int:
        """Send `sig` and wait for the process to end (SIGKILL after `timeout`); its exit status."""
        assert self.process is not None, "not started"
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.client is not None:
            self.client.close()
        return self.process.returncode

    def stop(self, timeout: float = 30) -> int:
        """End it the way an operator's process manager does: SIGTERM, then SIGKILL after `timeout`."""
        return self.kill(signal.SIGTERM, timeout)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rss_bytes(self) -> int:
        import psutil

        assert self.process is not None, "not started"
        rss: int = psutil.Process(self.process.pid).memory_info().rss
        return rss

    def __enter__(self) -> ServiceProcess:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.process is not None:
            self.stop()


class WorkerProcess:
    """`imagegen worker` in its own process, with the service's folders under `folder` (share them
    with the API replicas: the output folder must be the same), its log in `folder`/worker-NAME.log.
    `start()` returns once the worker says it is ready (its first heartbeat is in Redis)."""

    _count = 0

    def __init__(
        self,
        folder: Path,
        *,
        backends: Sequence[str] = ("fake",),
        factories: Sequence[str] = (FAKE_FACTORY,),
        args: Sequence[str] = (),
        name: str | None = None,
        ready_timeout: float = 60.0,
        **env: str,
    ) -> None:
        WorkerProcess._count += 1
        self.folder = folder
        self.name = name or f"w{WorkerProcess._count}-{os.getpid()}"
        self.command = [sys.executable, *WORKER, "--name", self.name]
        for backend in backends:
            self.command += ["--backend", backend]
        for factory in factories:
            self.command += ["--backend-factory", factory]
        self.command += list(args)
        self.env = service_env(folder, env)
        self.ready_timeout = ready_timeout
        self.log_path = folder / f"worker-{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_seconds = 0.0

    def start(self) -> WorkerProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command, cwd=self.folder, env=self.env, stdout=subprocess.DEVNULL, stderr=log
            )
        deadline = time.monotonic() + self.ready_timeout
        while f"imagegen worker {self.name} ready" not in self.log()[offset:]:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"worker {self.name} was not ready after {self.ready_timeout:g} s:\n{self.log()}")
            time.sleep(0.02)
        self.ready_seconds = time.perf_counter() - started
        return self

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30) -> int:
        assert self.process is not None, "not started"
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def stop(self, timeout: float = 30) -> int:
        return self.kill(signal.SIGTERM, timeout)

    def signal(self, sig: int) -> None:
        """Send a signal without waiting (SIGSTOP / SIGCONT: a worker that stalls, then comes back)."""
        assert self.process is not None, "not started"
        self.process.send_signal(sig)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.running:
            self.stop()


def wait_until(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get(f"/api/jobs/{job_id}").json()
        if body["status"] in statuses:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def db_statuses(tmp: Path) -> dict[str, str]:
    with sqlite3.connect(tmp / "data" / "jobs.sqlite3") as conn:
        return dict(conn.execute("SELECT id, status FROM jobs").fetchall())
