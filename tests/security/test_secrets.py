"""Secrets never leak: a canary API key, BFL key, Hugging Face token and webhook secret are searched
for in every captured log line (all loggers, DEBUG), stdout/stderr, every response (bodies and
headers, errors included), the metrics, and every file the service wrote (images, the SQLite job
database), after a session that exercises success and failure paths on every backend.

Threats: keys echoed into logs (pydantic-settings #256 echoes input values in validation errors);
keys in query strings reaching access logs; an upstream error body echoing the key back."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from imagegen.config import Settings, SettingsError, load_settings
from imagegen.main import create_app
from tests.support.fake_backend import FakeBackend
from tests.support.fake_bfl import FakeBFL
from tests.support.server import LiveServer, wait_ready

API_KEY = "CANARY-apikey-7d1f0e"
BFL_KEY = "bfl_CANARY-bflkey-4a9c2b"
HF_TOKEN = "hf_CANARYtoken9e8d7c"
WEBHOOK_SECRET = "CANARY-whsecret-1b2c3d"
WRONG_KEY = "CANARY-wrongkey-5e6f7a"
CANARIES = (API_KEY, BFL_KEY, HF_TOKEN, WEBHOOK_SECRET, WRONG_KEY)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        if record.exc_info:
            self.lines.append(logging.Formatter().formatException(record.exc_info))


@pytest.fixture
def logs() -> Iterator[_Collect]:
    handler = _Collect()
    loggers = [
        logging.getLogger(),
        logging.getLogger("imagegen"),
        logging.getLogger("uvicorn"),
        logging.getLogger("httpx"),
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    yield handler
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_no_canary_anywhere(tmp_path: Path, model_dir: Path, logs: _Collect, capfd: pytest.CaptureFixture[str]) -> None:
    seen: list[str] = []
    received: list[bytes] = []

    async def hook(request: Request) -> JSONResponse:
        received.append(await request.body())
        return JSONResponse({})

    fake_bfl = FakeBFL(api_key=BFL_KEY, generation_time=0.05)
    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    with LiveServer(fake_bfl.app) as bfl, LiveServer(receiver) as hooks:
        settings = Settings(
            _env_file=None,
            host="127.0.0.1",
            model_dir=model_dir,
            model_id="tiny-sd",
            output_dir=tmp_path / "outputs",
            data_dir=tmp_path / "data",
            log_level="debug",
            api_key=API_KEY,
            huggingface_token=HF_TOKEN,
            webhook_secret=WEBHOOK_SECRET,
            bfl_api_key=BFL_KEY,
            bfl_api_url=bfl.url,
            bfl_poll_interval=0.01,
            bfl_poll_max_interval=0.05,
            bfl_retry_backoff=0.01,
            bfl_max_retries=1,
            webhook_backoff=0.01,
            webhook_allow_private=True,  # the receiver listens on loopback
        )
        app = create_app(settings, backend_factories={"fake": lambda s: FakeBackend(s)}, default_backend="fake")
        with (
            LiveServer(app) as server,
            httpx.Client(base_url=server.url, timeout=60, headers={"X-API-Key": API_KEY}) as client,
        ):
            wait_ready(client)

            def record(response: httpx.Response) -> httpx.Response:
                seen.append(response.text)
                seen.append(repr(dict(response.headers)))
                return response

            record(client.post("/api/txt2img", json={"prompt": "fake ok", "seed": 1}))
            record(client.post("/api/txt2img", json={"prompt": "fail", "seed": 1}))
            record(client.post("/api/txt2img", json={"prompt": "sd ok", "backend": "sd", "steps": 2}))
            record(
                client.post(
                    "/api/txt2img", json={"prompt": "cloud ok", "backend": "flux-api", "width": 256, "height": 256}
                )
            )
            # Upstream errors that echo the key back.
            fake_bfl.inject("submit", 422, body={"detail": f"bad request for key {BFL_KEY}"})
            record(
                client.post(
                    "/api/txt2img", json={"prompt": "cloud 422", "backend": "flux-api", "width": 256, "height": 256}
                )
            )
            fake_bfl.inject("submit", 500, times=5, body={"detail": f"internal: {BFL_KEY}"})
            record(
                client.post(
                    "/api/txt2img", json={"prompt": "cloud 500", "backend": "flux-api", "width": 256, "height": 256}
                )
            )
            fake_bfl.inject("submit", 401, body={"detail": f"key {BFL_KEY} rejected"})
            record(
                client.post(
                    "/api/txt2img", json={"prompt": "cloud 401", "backend": "flux-api", "width": 256, "height": 256}
                )
            )
            job = record(client.post("/api/jobs", json={"prompt": "hooked", "callback_url": f"{hooks.url}/hook"}))
            record(client.get(f"/api/jobs/{job.json()['id']}"))
            # Wrong keys, and keys where they do not belong.
            for headers in ({"X-API-Key": WRONG_KEY}, {"Authorization": f"Bearer {WRONG_KEY}"}):
                record(httpx.get(f"{server.url}/api/backends", headers=headers))
            record(httpx.get(f"{server.url}/api/backends", params={"api_key": API_KEY}))
            record(client.post("/api/txt2img", json={"prompt": API_KEY, "seed": API_KEY}))  # echo bait
            for path in ("/health", "/info", "/api/backends", "/metrics", "/api/jobs", "/api/images", "/openapi.json"):
                record(client.get(path))
            import time

            deadline = time.monotonic() + 10
            while not received and time.monotonic() < deadline:
                time.sleep(0.05)
        assert received, "the webhook was delivered"

    # Settings errors name the setting, never the value.
    try:
        load_settings(_env_file=None, port=API_KEY)
    except SettingsError as error:
        seen.append(str(error))

    captured = capfd.readouterr()
    haystacks = {
        "logs": "\n".join(logs.lines),
        "stdout": captured.out,
        "stderr": captured.err,
        "responses": "\n".join(seen),
        "webhook bodies": b"\n".join(received).decode("utf-8", "replace"),
    }
    for path in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
        haystacks[str(path.relative_to(tmp_path))] = path.read_bytes().decode("latin-1")
    assert len(logs.lines) > 20 and any(name.endswith("jobs.sqlite3") for name in haystacks)
    for where, text in haystacks.items():
        for canary in CANARIES:
            assert canary not in text, f"{canary} found in {where}"
