from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from imagegen.config import Settings
from imagegen.main import create_app
from tests.support.fake_backend import FakeBackend
from tests.support.server import LiveServer, wait_ready


@pytest.fixture(scope="module")
def sd_client(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[httpx.Client]:
    """One live server per module on the built-in tiny-sd model (default backend), with a fake
    backend beside it."""
    root = tmp_path_factory.mktemp("sd-server")
    settings = Settings(
        _env_file=None, model_id="tiny-sd", model_dir=model_dir, output_dir=root / "outputs",
        data_dir=root / "data", host="127.0.0.1",
    )
    app = create_app(settings, backend_factories={"fake": lambda s: FakeBackend(s)})
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        client.app = app  # type: ignore[attr-defined]
        wait_ready(client)
        yield client
