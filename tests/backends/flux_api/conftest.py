"""Fixtures of the flux-api tests: a fake BFL server on loopback and a service pointed at it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from imagegen.config import Settings
from tests.support.fake_bfl import FakeBFL
from tests.support.server import LiveServer

#: A key shaped like BFL's, unique enough that finding it anywhere is a leak.
CANARY_KEY = "bfl_CANARY-7f3a9c1e5b-never-print-me"

#: Short timings keep the suite fast; each test that needs otherwise says so.
FAST_BFL: dict[str, Any] = {
    "bfl_poll_interval": 0.01,
    "bfl_poll_max_interval": 0.05,
    "bfl_retry_backoff": 0.01,
    "bfl_max_retries": 3,
    "bfl_timeout": 10.0,
    "bfl_request_timeout": 5.0,
}


class RunningFake:
    def __init__(self, fake: FakeBFL, server: LiveServer) -> None:
        self.fake = fake
        self.server = server
        self.url = server.url


@pytest.fixture
def start_fake() -> Iterator[Callable[..., RunningFake]]:
    """Start a fake BFL server (uvicorn, 127.0.0.1, port 0, in a thread)."""
    started: list[LiveServer] = []

    def start(**options: Any) -> RunningFake:
        options.setdefault("api_key", CANARY_KEY)
        options.setdefault("generation_time", 0.05)
        fake = FakeBFL(**options)
        server = LiveServer(fake.app).__enter__()
        started.append(server)
        return RunningFake(fake, server)

    yield start
    for server in reversed(started):
        server.__exit__(None, None, None)


@pytest.fixture
def bfl(start_fake: Callable[..., RunningFake]) -> RunningFake:
    return start_fake()


@pytest.fixture
def bfl_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    """Settings with flux-api as the default backend, pointed at a fake BFL server."""

    def make(fake: RunningFake, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "default_backend": "flux-api",
            "bfl_api_url": fake.url,
            "bfl_api_key": CANARY_KEY,
            **FAST_BFL,
        }
        values.update(overrides)
        return make_settings(**values)

    return make


@pytest.fixture
def flux_service(
    serve: Callable[..., httpx.Client], bfl_settings: Callable[..., Settings]
) -> Callable[..., httpx.Client]:
    """The real service (HTTP, engine, store) with flux-api pointed at the given fake."""

    def start(fake: RunningFake, *, ready: bool = True, **overrides: Any) -> httpx.Client:
        return serve(bfl_settings(fake, **overrides), ready=ready)

    return start
