"""Deployments of the service for the engine contract suite (tests/engine/test_contract.py) and the
cluster tests (tests/cluster/): the same API, the same fake backend and the same settings, run

- `embedded`: one process, the SQLite engine (the API in a thread of the test process);
- `redis`: a cluster on a real Redis server (tests/support/redis_server.py): the API replica in a
  thread of the test process, and a worker (`imagegen worker`) in its own process running the fake
  backend through `--backend-factory` (tests/support/fake_backend.py `from_env`).

Both write each fake step to a step log (job ids, step, time), so a test can tell when steps ran in
either engine (cancel "within one step").
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from imagegen.config import Settings
from imagegen.main import create_app
from tests.support.fake_backend import FakeBackend
from tests.support.process import ServiceProcess, WorkerProcess
from tests.support.server import LiveServer, wait_ready

_prefixes = itertools.count(1)

#: The fake backend's options a deployment passes to either engine (FAKE_* in a worker's environment).
FAKE_OPTIONS = {
    "step_delay": "FAKE_STEP_DELAY",
    "max_batch": "FAKE_MAX_BATCH",
    "default_steps": "FAKE_DEFAULT_STEPS",
    "models": "FAKE_MODELS",
}


def settings_env(overrides: dict[str, Any]) -> dict[str, str]:
    """Settings as the SD_* variables a worker process reads."""
    env = {}
    for name, value in overrides.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            text = ",".join(str(item) for item in value)
        else:
            text = str(value)
        env[f"SD_{name.upper()}"] = text
    return env


def unique_prefix() -> str:
    """A Redis namespace of its own for each deployment sharing the session's server."""
    return f"t{next(_prefixes)}-{int(time.time() * 1000) % 10_000_000}"


@dataclass
class Deployment:
    kind: str
    client: httpx.Client
    app: FastAPI
    folder: Path
    step_log: Path
    workers: list[WorkerProcess] = field(default_factory=list)
    #: the SD_* and FAKE_* environment of this deployment's processes (redis only)
    env: dict[str, str] = field(default_factory=dict)
    #: every process started for it, stopped at the end of the test
    processes: list[WorkerProcess | ServiceProcess] = field(default_factory=list)

    def add_worker(self, *args: str, **env: str) -> WorkerProcess:
        """One more worker process (options such as --model after it)."""
        worker = WorkerProcess(self.folder, args=args, **{**self.env, **env})
        self.processes.append(worker)
        self.workers.append(worker.start())
        return worker

    def add_replica(self, **env: str) -> httpx.Client:
        """One more API replica, in its own process (tests/support/serve_fake.py); a client for it."""
        replica = ServiceProcess(self.folder, **{**self.env, **env})
        self.processes.append(replica)
        return replica.start()

    def steps_of(self, job_id: str) -> list[tuple[int, float]]:
        """(step, unix time) of every step the fake ran for a job, in order."""
        if not self.step_log.exists():
            return []
        found = []
        for line in self.step_log.read_text().splitlines():
            ids, step, at = line.split()
            if job_id in ids.split(","):
                found.append((int(step), float(at)))
        return found


class Deployer:
    """Builds deployments of one kind for one test; closes them all at the end."""

    def __init__(self, kind: str, folder: Path, model_dir: Path, redis_url: str | None) -> None:
        self.kind = kind
        self.folder = folder
        self.model_dir = model_dir
        self.redis_url = redis_url
        self._servers: list[LiveServer] = []
        self._clients: list[httpx.Client] = []
        self._processes: list[WorkerProcess | ServiceProcess] = []
        self._count = 0

    def __call__(self, fake: dict[str, Any] | None = None, workers: int = 1, **overrides: Any) -> Deployment:
        self._count += 1
        folder = self.folder / f"d{self._count}"
        folder.mkdir(parents=True, exist_ok=True)
        step_log = folder / "steps.log"
        fake = {"step_delay": 0.02, **(fake or {})}
        values: dict[str, Any] = {
            "model_id": "tiny-sd",
            "model_dir": self.model_dir,
            "output_dir": folder / "outputs",
            "data_dir": folder / "data",
            "host": "127.0.0.1",
            "log_level": "warning",
            "default_backend": "sd",
            "max_steps": 1000,  # long blocker jobs
        }
        values.update(overrides)
        started: list[WorkerProcess] = []
        env: dict[str, str] = {}
        if self.kind == "redis":
            assert self.redis_url is not None
            values.setdefault("redis_url", self.redis_url)
            values.setdefault("redis_prefix", unique_prefix())
            values.setdefault("worker_lease_seconds", 2.0)
            env = settings_env({key: value for key, value in values.items() if key not in ("host",)})
            env.update(
                {
                    FAKE_OPTIONS[key]: ",".join(value) if isinstance(value, tuple) else str(value)
                    for key, value in fake.items()
                }
            )
            env["FAKE_STEP_LOG"] = str(step_log)
            for _ in range(workers):
                worker = WorkerProcess(folder, **env)
                self._processes.append(worker)
                started.append(worker.start())
        settings = Settings(_env_file=None, **values)

        def factory(settings: Settings) -> FakeBackend:
            backend = FakeBackend(settings, **fake)
            backend.step_log = str(step_log)
            return backend

        app = create_app(settings, backend_factories={"fake": factory}, default_backend="fake")
        server = LiveServer(app).__enter__()
        self._servers.append(server)
        client = httpx.Client(base_url=server.url, timeout=60)
        self._clients.append(client)
        if self.kind == "embedded" or workers:
            wait_ready(client, timeout=60)
        deployment = Deployment(self.kind, client, app, folder, step_log, started, env, self._processes)
        return deployment

    def close(self) -> None:
        for client in self._clients:
            client.close()
        for server in reversed(self._servers):
            server.__exit__(None, None, None)
        for process in self._processes:
            if process.running:
                process.kill()


def deployer(kind: str, folder: Path, model_dir: Path, redis_url: str | None) -> Iterator[Deployer]:
    made = Deployer(kind, folder, model_dir, redis_url)
    try:
        yield made
    finally:
        made.close()
