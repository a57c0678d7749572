"""Hostile input: path traversal against every route that takes a name or an id, oversized and
non-JSON bodies, decompression-bomb dimensions, huge prompts, NaN/Infinity/huge numbers. Every
answer is a 4xx, the backend is never called, and sentinel files outside the service's folders are
untouched.

Threats: InvokeAI CVE-2024-11042 / CVE-2025-6237 and ComfyUI CVE-2026-56671/56673 (path traversal in
file view/delete routes), ComfyUI #12285 (containment checked before symlinks were resolved),
vllm-omni PR #3381 (a huge size crashed the server), decompression bombs."""

from __future__ import annotations

import itertools
import json
import os
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from imagegen.config import Settings
from imagegen.main import create_app
from tests.support.fake_backend import FakeBackend
from tests.support.server import LiveServer, wait_ready

SENTINEL = b"sentinel: must never be served, changed or deleted"


def traversal_corpus() -> list[str]:
    """More than 200 hostile names: plain, encoded, double-encoded, overlong-UTF-8, backslashes,
    absolute paths, NUL bytes, dot tricks, aimed at files beside and above the output folder."""
    targets = ["secret.png", "../secret.png", "sentinel.txt", "etc/passwd", "data/jobs.sqlite3"]
    climbs = [
        "../",
        "..\\",
        "../../",
        "..%2f",
        "..%2F",
        "%2e%2e/",
        "%2e%2e%2f",
        "%2E%2E%2F",
        "%252e%252e%252f",
        "..%252f",
        "%c0%ae%c0%ae/",
        "%c0%ae%c0%ae%c0%af",
        "..%c0%af",
        "..%5c",
        "%2e%2e%5c",
        "....//",
        "..;/",
        ".%2e/",
        "%2e./",
        "..%00/",
        "..\\..\\",
        "%u002e%u002e/",
    ]
    names = [climb * depth + target for climb, depth, target in itertools.product(climbs, (1, 4), targets)]
    names += [
        "/etc/passwd",
        "%2fetc%2fpasswd",
        "%252fetc%252fpasswd",
        "C:\\Windows\\win.ini",
        "C:%5cWindows%5cwin.ini",
        "\\\\server\\share\\x.png",
        "file:///etc/passwd",
        "20261127-000000-aaaaaaaaaaaa.png%00.txt",
        "20261127-000000-aaaaaaaaaaaa.png\\..\\..\\secret.png",
        "20261127-000000-aaaaaaaaaaaa.png/../../secret.png",
        "20261127-000000-aaaaaaaaaaaa.png%2f..%2f..%2fsecret.png",
        ".",
        "..",
        "...",
        "%2e",
        "%2e%2e",
        "~",
        "~root",
        "20261127-000000-aaaaaaaaaaaa.PNG",
        "20261127-000000-aaaaaaaaaaaa.svg",
        "20261127-000000-aaaaaaaaaaaa.html",
        "x" * 300,
        "%00",
        "%0a",
        "%0d%0aSet-Cookie:x=1",
        "link-out.png",
        "20261127-000000-bbbbbbbbbbbb.png",
    ]
    return names


CORPUS = traversal_corpus()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("hostile")
    outputs = root / "service" / "outputs"
    outputs.mkdir(parents=True)
    sentinels = [
        root / "secret.png",
        root / "service" / "secret.png",
        root / "sentinel.txt",
        root / "service" / "sentinel.txt",
    ]
    for path in sentinels:
        path.write_bytes(SENTINEL)
    # A symlink with a valid output name that leaves the folder (ComfyUI #12285).
    os.symlink(root / "secret.png", outputs / "20261127-000000-bbbbbbbbbbbb.png")
    os.symlink(root / "sentinel.txt", outputs / "link-out.png")
    holder: dict[str, FakeBackend] = {}

    def factory(settings: Settings) -> FakeBackend:
        holder["fake"] = FakeBackend(settings)
        return holder["fake"]

    settings = Settings(
        _env_file=None,
        output_dir=outputs,
        data_dir=root / "service" / "data",
        host="127.0.0.1",
        log_level="error",
        max_body_bytes=65536,
        max_upload_bytes=65536,  # the image routes' own limit (SD_MAX_UPLOAD_BYTES), here as small
    )
    app = create_app(settings, backend_factories={"fake": factory}, default_backend="fake")
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        wait_ready(client)
        stats = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in sentinels}
        yield {
            "client": client,
            "fake": holder["fake"],
            "server": server,
            "sentinels": stats,
            "outputs": outputs,
            "host": server.url.split("//")[1],
        }
        for path, (content, mtime) in stats.items():
            assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime, path
        assert (outputs / "20261127-000000-bbbbbbbbbbbb.png").is_symlink()


def raw_request(host: str, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None) -> int:
    """Send exactly this request target (no client-side normalisation of dots or encodings)."""
    address, port = host.split(":")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close", f"Content-Length: {len(body)}"]
    lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
    with socket.create_connection((address, int(port)), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        response = b""
        while b"\r\n" not in response:
            chunk = sock.recv(4096)
            if not chunk:
                break
            response += chunk
    return int(response.split(b" ", 2)[1])


ROUTES = [
    ("GET", "/api/images/{}"),
    ("DELETE", "/api/images/{}"),
    ("GET", "/api/jobs/{}"),
    ("GET", "/api/jobs/{}/events"),
    ("POST", "/api/jobs/{}/cancel"),
    ("DELETE", "/api/jobs/{}"),
]


def test_corpus_is_large_enough() -> None:
    assert len(set(CORPUS)) >= 200


@pytest.mark.parametrize(("method", "route"), ROUTES)
def test_traversal_names_never_escape(hostile: dict[str, Any], method: str, route: str) -> None:
    calls = len(hostile["fake"].calls)
    for name in CORPUS:
        # As sent by a browser-like client (encoded once) and raw (the name as is, where it is legal).
        targets = {route.format(quote(name, safe="")), route.format(quote(name, safe="/%\\:~;"))}
        for target in targets:
            status = raw_request(hostile["host"], method, target)
            assert status in (400, 404, 405), (method, target, status)
    assert len(hostile["fake"].calls) == calls


def test_symlink_leaving_the_output_folder_is_neither_served_nor_deleted(hostile: dict[str, Any]) -> None:
    client = hostile["client"]
    for name in ("20261127-000000-bbbbbbbbbbbb.png", "link-out.png"):
        assert client.get(f"/api/images/{name}").status_code == 404
        assert client.delete(f"/api/images/{name}").status_code == 404
    listed = client.get("/api/images").json()
    assert all(item["name"] != "20261127-000000-bbbbbbbbbbbb.png" for item in listed.get("images", []))


POST_ROUTES = ["/api/txt2img", "/api/jobs", "/api/img2img"]


@pytest.mark.parametrize("path", POST_ROUTES)
def test_oversized_bodies_are_refused_before_parsing(hostile: dict[str, Any], path: str) -> None:
    host = hostile["host"]
    # Announced too large: answered without reading a byte of the body.
    address, port = host.split(":")
    with socket.create_connection((address, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {10**12}\r\n\r\n".encode()
        )
        answer = sock.recv(4096)
    assert answer.split(b" ", 2)[1] == b"413"
    big = b'{"prompt": "' + b"a" * 70_000 + b'"}'
    assert raw_request(host, "POST", path, big, {"Content-Type": "application/json"}) == 413


@pytest.mark.parametrize("path", POST_ROUTES)
@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", b'{"prompt": "x"}'),
        ("application/x-www-form-urlencoded", b"prompt=x"),
        ("multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--b--'),
        ("application/xml", b"<prompt>x</prompt>"),
        ("", b'{"prompt": "x"}'),
        ("image/png", b"\x89PNG\r\n"),
    ],
)
def test_non_json_bodies_are_415(hostile: dict[str, Any], path: str, content_type: str, body: bytes) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    assert raw_request(hostile["host"], "POST", path, body, headers) == 415


BAD_BODIES: list[Any] = [
    {"prompt": "bomb", "width": 100_000, "height": 100_000},
    {"prompt": "bomb", "width": 16384, "height": 16384},
    {"prompt": "bomb", "width": 4096, "height": 4096},
    {"prompt": "bomb", "width": 2**31, "height": 8},
    {"prompt": "bomb", "width": -64, "height": 64},
    {"prompt": "bomb", "num_images": 10**6},
    {"prompt": "bomb", "steps": 10**9},
    {"prompt": "x" * 20_000},
    {"prompt": "x", "negative_prompt": "y" * 20_000},
    {"prompt": "x", "seed": 10**40},
    {"prompt": "x", "seed": -(10**40)},
    {"prompt": "x", "guidance_scale": 1e308},
    {"prompt": "x", "priority": 10**12},
    {"prompt": "x", "callback_url": "http://169.254.169.254/latest/meta-data/"},
    {"prompt": ["x"] * 1000},
    {"prompt": {"$ne": None}},
    {"prompt": "x", "width": "512; DROP TABLE jobs"},
]
RAW_BAD = [
    b'{"prompt": "x", "guidance_scale": NaN}',
    b'{"prompt": "x", "guidance_scale": Infinity}',
    b'{"prompt": "x", "guidance_scale": -Infinity}',
    b'{"prompt": "x", "seed": 1e400}',
    b'{"prompt": "x", "width": 99999999999999999999999999999999999999}',
    b"[" * 5000 + b"]" * 5000,
    b'{"prompt": "\\ud800"}',
    b"\xff\xfe{\x00",
    b"null",
    b"",
]


@pytest.mark.parametrize("path", POST_ROUTES)
def test_extreme_values_are_4xx_and_never_reach_the_backend(hostile: dict[str, Any], path: str) -> None:
    client, fake = hostile["client"], hostile["fake"]
    calls = len(fake.calls)
    for body in BAD_BODIES:
        if path == "/api/txt2img" and ("priority" in body or "callback_url" in body):
            continue  # job-only fields: on txt2img they are unknown keys (422) as well, covered elsewhere
        response = client.post(path, json=body)
        assert 400 <= response.status_code < 500, (body, response.status_code)
        assert response.json()["error"]["type"]
    for raw in RAW_BAD:
        response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert 400 <= response.status_code < 500, (raw[:60], response.status_code)
    assert len(fake.calls) == calls
    assert client.get("/health").status_code == 200


# -- a body whose cost is in its keys: the work is bounded by the fields, not by the body -------------------

#: Unknown keys a body can carry under a 1 MiB limit (the issue's attack: about 80,000).
MANY_KEYS = 80_000


def many_unknown_keys(count: int = MANY_KEYS) -> dict[str, Any]:
    return {"prompt": "x", **{f"k{index:05d}": 1 for index in range(count)}}


@pytest.mark.parametrize("model", ["Txt2ImgRequest", "JobCreateRequest"])
def test_unknown_keys_are_validated_only_up_to_a_bound(model: str) -> None:
    from pydantic import ValidationError

    from imagegen.api import schemas

    with pytest.raises(ValidationError) as raised:
        getattr(schemas, model).model_validate(many_unknown_keys())
    errors = raised.value.errors(include_url=False)
    assert 1 <= len(errors) <= schemas.MAX_UNKNOWN_KEYS  # not 80,000 errors built and thrown away
    assert [error["loc"] for error in errors] == [(f"k{index:05d}",) for index in range(len(errors))]
    assert {error["type"] for error in errors} == {"extra_forbidden"}


def test_known_fields_are_still_checked_beside_many_unknown_keys() -> None:
    from pydantic import ValidationError

    from imagegen.api.schemas import Txt2ImgRequest

    with pytest.raises(ValidationError) as raised:
        Txt2ImgRequest.model_validate({**many_unknown_keys(), "width": "wide"})
    assert ("width",) in [error["loc"] for error in raised.value.errors()]
    assert Txt2ImgRequest.model_validate({"prompt": "x", "seed": 3}).seed == 3


@pytest.mark.parametrize("path", POST_ROUTES)
def test_a_body_of_many_unknown_keys_is_one_422(hostile: dict[str, Any], path: str) -> None:
    client = hostile["client"]
    # The fixture's body limit is 64 KiB. /api/img2img requires images: without any, a missing field would
    # be the first problem named (validation stops before an image is decoded, so any string will do).
    required = {"images": ["aW1hZ2U="]} if path == "/api/img2img" else {}
    body = json.dumps({**many_unknown_keys(4000), **required}).encode()
    response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"] == {
        "type": "invalid_parameter",
        "message": "unknown parameter 'k00000'",
        "param": "k00000",
        "request_id": response.headers["x-request-id"],
    }
