"""Bad input: each a 4xx in the error envelope naming the parameter, checked before any backend runs,
and never echoing the value sent."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

CANARY = "CANARY-e1f9"


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Any]]:
    from imagegen.config import Settings
    from imagegen.main import create_app
    from tests.support.fake_backend import FakeBackend
    from tests.support.server import LiveServer, wait_ready

    root = tmp_path_factory.mktemp("validation")
    holder: dict[str, FakeBackend] = {}

    def factory(settings: Settings) -> FakeBackend:
        holder["fake"] = FakeBackend(settings)
        return holder["fake"]

    settings = Settings(
        _env_file=None,
        output_dir=root / "o",
        data_dir=root / "d",
        host="127.0.0.1",
        max_width=1024,
        max_height=1024,
        max_pixels=512 * 1024,
        max_steps=50,
        max_images=4,
        max_prompt_chars=100,
        max_body_bytes=8192,
    )
    app = create_app(settings, backend_factories={"fake": factory}, default_backend="fake")
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        wait_ready(client)
        yield client, holder["fake"]


def check_error(response: httpx.Response, status: int, param: str | None, error_type: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"type", "message", "param", "request_id"}
    assert error["request_id"] == response.headers["x-request-id"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    if error_type is not None:
        assert error["type"] == error_type
    assert CANARY not in response.text
    return error


CASES: list[tuple[dict[str, Any], int, str | None, str]] = [
    ({"prompt": "x", "width": 100}, 422, "width", "multiple of 8"),
    ({"prompt": "x", "height": 2048}, 422, "height", "at most 1024"),
    ({"prompt": "x", "width": 1024, "height": 1024}, 422, "width", "SD_MAX_PIXELS"),
    ({"prompt": "x", "width": 4}, 422, "width", "at least"),
    ({"prompt": "x", "width": 100000}, 422, "width", "less than or equal"),
    ({"prompt": "x", "steps": 51}, 422, "steps", "between 1 and 50"),
    ({"prompt": "x", "steps": 0}, 422, "steps", "greater than or equal"),
    ({"prompt": ""}, 422, "prompt", "at least 1"),
    ({"prompt": "   "}, 422, "prompt", "must not be empty"),
    ({"prompt": "x" * 101}, 422, "prompt", "SD_MAX_PROMPT_CHARS"),
    ({"prompt": "x", "negative_prompt": "y" * 101}, 422, "negative_prompt", "SD_MAX_PROMPT_CHARS"),
    ({"prompt": "x", "num_images": 5}, 422, "num_images", "SD_MAX_IMAGES"),
    ({"prompt": "x", "num_images": 0}, 422, "num_images", "greater than or equal"),
    ({"prompt": "x", "width": CANARY}, 422, "width", "valid integer"),
    # Numeric strings are accepted ("512", what n8n sends: tests/api/test_n8n.py); nothing looser.
    ({"prompt": "x", "width": "512.0"}, 422, "width", "valid integer"),
    ({"prompt": "x", "steps": "1e3"}, 422, "steps", "valid integer"),
    ({"prompt": "x", "guidance_scale": "nan"}, 422, "guidance_scale", "valid number"),
    ({"prompt": "x", "seed": 1.5}, 422, "seed", "valid integer"),
    ({"prompt": "x", "seed": True}, 422, "seed", "valid integer"),
    ({"prompt": "x", "seed": 2**32}, 422, "seed", "less than or equal"),
    ({"prompt": "x", "seed": 2**80}, 422, "seed", ""),
    ({"prompt": "x", "seed": -2}, 422, "seed", "greater than or equal"),
    ({"prompt": 5}, 422, "prompt", "valid string"),
    ({"prompt": ["a", CANARY]}, 422, "prompt", "valid string"),
    ({"prompt": "x", "guidance_scale": 1e300}, 422, "guidance_scale", "less than or equal"),
    ({"prompt": "x", "guidance_scale": 101}, 422, "guidance_scale", "less than or equal"),
    ({"prompt": "x", CANARY: 1}, 422, CANARY, "unknown parameter"),
    ({"prompt": "x", "backend": CANARY}, 422, "backend", "known backends: sd, flux-local, flux-api, fake"),
    ({"prompt": "x", "scheduler": CANARY}, 422, "scheduler", "available: default, euler"),
    ({"prompt": "x", "output_format": "gif"}, 422, "output_format", ""),
    ({"prompt": "x", "model": CANARY}, 422, "model", "available: fake-model"),
    ({"width": 64}, 422, "prompt", "Field required"),
]


@pytest.mark.parametrize(("body", "status", "param", "fragment"), CASES)
def test_bad_parameters(
    fake_server: tuple[httpx.Client, Any], body: dict, status: int, param: str | None, fragment: str
) -> None:
    client, fake = fake_server
    calls = len(fake.calls)
    for path in ("/api/txt2img", "/api/jobs"):
        # The canary key must not come back even when it is the unknown key's name... except as the
        # param itself: names are not values.
        response = client.post(path, json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["param"] == param
        assert fragment in error["message"]
        if param != CANARY:
            assert CANARY not in response.text
    assert len(fake.calls) == calls, "the backend must never see invalid input"


RAW: list[tuple[bytes, dict[str, str], int, str]] = [
    (b'{"prompt": "x", "guidance_scale": NaN}', {"Content-Type": "application/json"}, 422, "invalid_parameter"),
    (b'{"prompt": "x", "guidance_scale": Infinity}', {"Content-Type": "application/json"}, 422, "invalid_parameter"),
    (b'{"prompt": "x",', {"Content-Type": "application/json"}, 400, "invalid_json"),
    (b'["prompt"]', {"Content-Type": "application/json"}, 400, "invalid_request"),
    (b'"prompt"', {"Content-Type": "application/json"}, 400, "invalid_request"),
    (b"", {"Content-Type": "application/json"}, 400, "invalid_request"),
    (b"prompt=x", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    (b"prompt=x", {"Content-Type": "multipart/form-data; boundary=x"}, 415, "unsupported_media_type"),
    (b'{"prompt": "x"}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    (b'{"prompt": "x"}', {}, 415, "unsupported_media_type"),
    (b'{"prompt": "' + b"x" * 9000 + b'"}', {"Content-Type": "application/json"}, 413, "payload_too_large"),
]


@pytest.mark.parametrize(("content", "headers", "status", "error_type"), RAW)
def test_malformed_bodies(
    fake_server: tuple[httpx.Client, Any], content: bytes, headers: dict[str, str], status: int, error_type: str
) -> None:
    client, fake = fake_server
    calls = len(fake.calls)
    response = client.post("/api/txt2img", content=content, headers=headers)
    check_error(response, status, None, error_type)
    assert len(fake.calls) == calls


def test_chunked_oversized_body_is_refused(fake_server: tuple[httpx.Client, Any]) -> None:
    client, _ = fake_server

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 1000
        yield b'"}'

    response = client.post("/api/txt2img", content=chunks(), headers={"Content-Type": "application/json"})
    check_error(response, 413, None, "payload_too_large")


def test_unknown_route_and_method(fake_server: tuple[httpx.Client, Any]) -> None:
    client, _ = fake_server
    check_error(client.get("/api/nothing-here"), 404, None, "not_found")
    check_error(client.get("/api/txt2img"), 405, None, "method_not_allowed")


def test_valid_request_still_works(fake_server: tuple[httpx.Client, Any]) -> None:
    client, fake = fake_server
    response = client.post("/api/txt2img", json={"prompt": "fine", "width": 512, "height": 1024, "seed": 3})
    assert response.status_code == 200, response.text
    assert response.json()["images"][0]["seed"] == 3
    assert fake.calls[-1][0].width == 512
