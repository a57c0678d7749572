"""API key: three header forms accepted, everything but /health and /health/live protected,
constant-time comparison, and the warning when the service is exposed without a key.

Threats: LocalAI CVE-2024-7010 (non-constant-time key compare), unauthenticated access to a
service bound to 0.0.0.0, keys in query strings reaching access logs."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable

import httpx
import pytest

KEY = "k3y-Canary-0d1e"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def client(serve: Callable[..., httpx.Client], fake_factory) -> httpx.Client:
    factories, _ = fake_factory()
    return serve(api_key=KEY, factories=factories, default_backend="fake")


def test_health_routes_stay_open(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/health/live").status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": KEY},
        {"Authorization": f"Bearer {KEY}"},
        {"Authorization": f"bearer {KEY}"},
        {"Authorization": f"Bearer\t{KEY}"},  # RFC 7235/9110: any spaces or tabs after the scheme
        {"Authorization": f"Bearer \t {KEY}"},
        {"Authorization": basic("anyone", KEY)},
        {"Authorization": basic("", KEY)},
    ],
)
def test_each_accepted_form(client: httpx.Client, headers: dict[str, str]) -> None:
    assert client.get("/api/backends", headers=headers).status_code == 200
    response = client.post("/api/txt2img", json={"prompt": "x", "seed": 1}, headers=headers)
    assert response.status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "wrong"},
        {"X-API-Key": KEY + "x"},
        {"X-API-Key": KEY[:-1]},
        {"Authorization": f"Bearer {KEY[:-1]}"},
        {"Authorization": f"Token {KEY}"},
        {"Authorization": KEY},
        {"Authorization": basic(KEY, "nope")},
        {"Authorization": "Basic !!!notbase64"},
        {"X-API-Key": ""},
    ],
)
def test_wrong_or_missing_key_is_401(client: httpx.Client, headers: dict[str, str]) -> None:
    response = client.get("/api/backends", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and error["request_id"]
    assert KEY not in response.text


def test_key_in_query_string_is_not_accepted(client: httpx.Client) -> None:
    assert client.get("/api/backends", params={"api_key": KEY, "key": KEY}).status_code == 401


def test_every_route_but_health_requires_the_key(client: httpx.Client) -> None:
    app = client.app  # type: ignore[attr-defined]
    operations = [(method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item]
    operations += [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc")]
    assert len(operations) >= 12
    for method, template in operations:
        path = template.replace("{name}", "20260101-000000-aaaaaaaaaaaa.png").replace("{job_id}", "0" * 32)
        public = template in ("/health", "/health/live")
        for headers in (
            {},
            {"X-API-Key": "wrong"},
            {"Authorization": "Bearer wrong"},
            {"Authorization": basic("user", "wrong")},
        ):
            response = client.request(method, path, headers=headers)
            if public:
                assert response.status_code == 200, (method, template)
            else:
                assert response.status_code == 401, (method, template, headers, response.status_code)
        for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}, {"Authorization": basic("u", KEY)}):
            if template.endswith("/events"):
                continue  # a stream; its authenticated answer is covered by the job tests
            response = client.request(method, path, headers=headers)
            assert response.status_code != 401, (method, template, headers)
    # Unknown paths too: an unauthenticated caller cannot map the API.
    assert client.get("/api/does-not-exist").status_code == 401


def test_keys_are_hashed_before_a_constant_time_compare(client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from imagegen.api import middleware

    seen: list[tuple[int, int]] = []
    real = middleware.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    for candidate in ("x", KEY[:3], KEY, KEY * 40):
        client.get("/api/backends", headers={"X-API-Key": candidate})
    # Whatever the candidate's length, the comparison sees two 32-byte digests: the time it takes
    # depends on neither the key's length nor how much of a guess matches.
    assert seen and all(pair == (32, 32) for pair in seen)


def test_all_candidates_are_compared_without_early_exit(client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from imagegen.api import middleware

    calls = []
    real = middleware.hmac.compare_digest
    monkeypatch.setattr(middleware.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    response = client.get("/api/backends", headers={"X-API-Key": KEY, "Authorization": "Bearer wrong"})
    assert response.status_code == 200
    assert len(calls) == 2


def test_public_bind_without_key_warns(make_settings, caplog: pytest.LogCaptureFixture) -> None:
    """The warning follows the address the server really listens on (read from its sockets), not SD_HOST:
    `uvicorn imagegen.main:app --host 127.0.0.1` with the default SD_HOST=0.0.0.0 must not warn."""
    import threading
    import time

    import uvicorn

    from imagegen.main import create_app

    def serve_briefly(host: str, settings) -> None:
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host=host, port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.01)
        # The check runs once the sockets are bound; give it time to have spoken.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not any("SECURITY" in r.getMessage() for r in caplog.records):
            time.sleep(0.05)
        server.should_exit = True
        thread.join(30)

    cases = [
        ("0.0.0.0", {}, True),
        ("0.0.0.0", {"api_key": KEY}, False),
        ("127.0.0.1", {"host": "0.0.0.0"}, False),  # SD_HOST says public, the socket is loopback: no warning
        ("127.0.0.1", {}, False),
    ]
    for bind, overrides, warned in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="imagegen"):
            logging.getLogger("imagegen").addHandler(caplog.handler)
            try:
                serve_briefly(bind, make_settings(default_backend="flux-api", **overrides))
            finally:
                logging.getLogger("imagegen").removeHandler(caplog.handler)
        found = [record.getMessage() for record in caplog.records if "SECURITY" in record.getMessage()]
        assert bool(found) is warned, (bind, overrides, found)
        if found:
            assert "listening on 0.0.0.0:" in found[0]
        assert KEY not in caplog.text


def test_cors_is_closed_by_default_and_exact_when_set(serve: Callable[..., httpx.Client]) -> None:
    closed = serve()
    response = closed.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers
    preflight = closed.options(
        "/api/txt2img", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers

    allowed = serve(cors_origins="https://ui.example", api_key=KEY)
    ok = allowed.options(
        "/api/txt2img",
        headers={
            "Origin": "https://ui.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key,content-type",
        },
    )
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "https://ui.example"
    denied = allowed.options(
        "/api/txt2img", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert denied.headers.get("access-control-allow-origin") != "https://evil.example"
