"""HEAD answers like GET without a body, on every GET route (RFC 9110 9.3.2): probes and link
checkers send it (a 405 there reads as "down")."""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx
import pytest


@pytest.fixture
def client(serve: Callable[..., httpx.Client], fake_factory) -> httpx.Client:
    factories, _ = fake_factory(step_delay=0.2)
    return serve(factories=factories, default_backend="fake")


@pytest.mark.parametrize("path", ["/health/live", "/health", "/", "/web/main.js", "/api/backends", "/openapi.json"])
def test_head_is_get_without_the_body(client: httpx.Client, path: str) -> None:
    got = client.get(path)
    head = client.head(path)
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.headers["content-length"] == got.headers["content-length"]
    for name in ("x-request-id", "x-content-type-options"):
        assert name in head.headers
    if path == "/":
        assert head.headers["content-security-policy"] == got.headers["content-security-policy"]


def test_head_on_a_stream_ends_after_its_headers(client: httpx.Client) -> None:
    job = client.post("/api/jobs", json={"prompt": "hang: a job that never ends"}).json()["id"]
    head = client.head(f"/api/jobs/{job}/events", timeout=5)
    assert head.status_code == 200 and head.headers["content-type"].startswith("text/event-stream")
    assert head.content == b""
    client.post(f"/api/jobs/{job}/cancel")


def test_head_where_there_is_no_get_is_405(client: httpx.Client) -> None:
    response = client.head("/api/txt2img")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert "HEAD" in client.post("/health/live").headers["allow"]  # GET routes list HEAD with GET


def test_head_needs_the_key_like_get(serve: Callable[..., httpx.Client], fake_factory) -> None:
    factories, _ = fake_factory()
    client = serve(factories=factories, default_backend="fake", api_key="head-key-1")
    assert client.head("/api/backends").status_code == 401
    assert client.head("/api/backends", headers={"X-API-Key": "head-key-1"}).status_code == 200
    assert client.head("/health/live").status_code == 200


def test_the_raw_answer_has_no_body(client: httpx.Client) -> None:
    host, port = str(client.base_url).removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"HEAD /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b""
