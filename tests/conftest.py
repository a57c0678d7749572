"""Shared fixtures: settings for a test, tiny models built once per session, live servers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagegen.config import Settings
from imagegen.main import create_app
from tests.support import redis_server as redis_support
from tests.support.cluster import Deployer, deployer
from tests.support.fake_backend import FakeBackend
from tests.support.process import ServiceProcess
from tests.support.server import LiveServer, wait_ready

# Tests never reach a model hub, and never pick up a developer's .env.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
for _name in list(os.environ):
    if _name.startswith("SD_"):
        del os.environ[_name]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model folder per session: built-in tiny models are built into it once."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def make_settings(tmp_path: Path, model_dir: Path) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model_id": "tiny-sd",
            "model_dir": model_dir,
            "output_dir": tmp_path / "outputs",
            "data_dir": tmp_path / "data",
            "host": "127.0.0.1",
            "log_level": "warning",
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return factory


@pytest.fixture
def serve(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., httpx.Client]]:
    """Start the real app on a loopback port; return an httpx client bound to it."""
    started: list[tuple[LiveServer, httpx.Client]] = []

    def start(
        settings: Settings | None = None,
        *,
        factories: dict[str, Any] | None = None,
        default_backend: str | None = None,
        ready: bool = True,
        headers: dict[str, str] | None = None,
        **overrides: Any,
    ) -> httpx.Client:
        settings = settings or make_settings(**overrides)
        app = create_app(settings, backend_factories=factories, default_backend=default_backend)
        server = LiveServer(app).__enter__()
        client = httpx.Client(base_url=server.url, timeout=120, headers=headers or {})
        client.app = app  # type: ignore[attr-defined]
        started.append((server, client))
        if ready:
            wait_ready(client)
        return client

    yield start
    for server, client in reversed(started):
        client.close()
        server.__exit__(None, None, None)


@pytest.fixture
def fake_factory() -> Callable[..., Any]:
    """A factory for `backend_factories` that also keeps the FakeBackend instance for assertions."""

    def make(**options: Any) -> tuple[dict[str, Any], dict[str, FakeBackend]]:
        holder: dict[str, FakeBackend] = {}

        def factory(settings: Settings) -> FakeBackend:
            backend = FakeBackend(settings, **options)
            holder["backend"] = backend
            return backend

        return {options.get("backend_id", "fake"): factory}, holder

    return make


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Services in their own processes (fake backend as default), sharing this test's folders, so a
    test can kill one for real and start the next on the same data."""
    made: list[ServiceProcess] = []

    def make(**env: str) -> ServiceProcess:
        made.append(ServiceProcess(tmp_path, **env))
        return made[-1]

    yield make
    for proc in made:
        if proc.running:
            proc.kill()


@pytest.fixture(scope="module")
def sd_client(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[httpx.Client]:
    """One live server per module on the built-in tiny-sd model (default backend), with a fake
    backend beside it."""
    root = tmp_path_factory.mktemp("sd-server")
    settings = Settings(
        _env_file=None,
        model_id="tiny-sd",
        model_dir=model_dir,
        output_dir=root / "outputs",
        data_dir=root / "data",
        host="127.0.0.1",
    )
    app = create_app(settings, backend_factories={"fake": lambda s: FakeBackend(s)})
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        client.app = app  # type: ignore[attr-defined]
        wait_ready(client)
        yield client


@pytest.fixture(scope="session")
def redis_server() -> Iterator[redis_support.RedisServer]:
    """One real Redis server for the session (Debian's redis-server on a unix socket); each deployment
    uses a namespace of its own (SD_REDIS_PREFIX). Tests that kill Redis start their own."""
    if not redis_support.available():
        pytest.skip(f"redis-server is not installed here ({redis_support.INSTALL_HINT})")
    with redis_support.RedisServer(fsync="everysec") as server:
        yield server


@pytest.fixture(params=["embedded", "redis"])
def deploy(request: pytest.FixtureRequest, tmp_path: Path, model_dir: Path) -> Iterator[Deployer]:
    """The engine contract: the same test against the embedded engine and a Redis cluster with a
    worker process (tests/support/cluster.py)."""
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    yield from deployer(request.param, tmp_path, model_dir, url)


@pytest.fixture
def cluster(tmp_path: Path, model_dir: Path, redis_server: redis_support.RedisServer) -> Iterator[Deployer]:
    """Redis-cluster deployments only (tests/cluster/)."""
    yield from deployer("redis", tmp_path, model_dir, redis_server.url)
