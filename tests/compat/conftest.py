"""One live service per test module for the compatibility tests: the real app under uvicorn on
loopback, with an API key, the tiny-sd model as the default sd model, tiny-sdxl allowed beside it
(SD_MODELS), and the deterministic fake backend (its "slow"/"hang" prompts drive progress, interrupt
and queue tests). The real client libraries talk to it over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagegen.config import Settings
from imagegen.main import create_app
from tests.support.fake_backend import FakeBackend
from tests.support.server import LiveServer, wait_ready

KEY = "compat-Key-3f9c1a"


@dataclass
class Service:
    url: str
    app: Any
    http: httpx.Client  # sends the key as X-API-Key
    fake: FakeBackend

    def restore_default(self) -> None:
        """Back to the settings' default checkpoint (tests that change it call this when done)."""
        self.app.state.services.registry.set_default("sd", "tiny-sd")


def start_service(
    root: Path, model_dir: Path, default_backend: str | None = None, **overrides: Any
) -> Iterator[Service]:
    holder: dict[str, FakeBackend] = {}

    def fake(settings: Settings) -> FakeBackend:
        holder["fake"] = FakeBackend(settings, step_delay=0.01, default_steps=4)
        return holder["fake"]

    values: dict[str, Any] = {
        "model_id": "tiny-sd",
        "models": ["tiny-sdxl"],
        "model_dir": model_dir,
        "output_dir": root / "outputs",
        "data_dir": root / "data",
        "host": "127.0.0.1",
        "api_key": KEY,
        "log_level": "warning",
    }
    values.update(overrides)
    settings = Settings(_env_file=None, **values)
    app = create_app(settings, backend_factories={"fake": fake}, default_backend=default_backend)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=120, headers={"X-API-Key": KEY}) as http:
        wait_ready(http)
        yield Service(server.url, app, http, holder["fake"])


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Service]:
    yield from start_service(tmp_path_factory.mktemp("compat"), model_dir)
