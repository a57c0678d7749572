"""Connections cannot be held: a request's headers and body must arrive in time, idle connections are
closed, and open connections are bounded without locking out new clients (slowloris, R.U.D.Y.).

`imagegen serve` runs the guarded protocol (api/connections.py); `uvicorn imagegen.main:app` keeps the
app's own body timeout. Each test would hang on for as long as the client likes without them."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from imagegen.api.connections import GuardedH11Protocol, server_config
from imagegen.config import Settings
from imagegen.main import create_app
from tests.support.server import LiveServer, wait_ready

LIMITS: dict[str, Any] = {"header_timeout": 1.0, "body_timeout": 1.0, "keepalive_timeout": 1, "max_connections": 16}


@pytest.fixture
def start(make_settings: Callable[..., Settings], fake_factory) -> Iterator[Callable[..., str]]:
    """Start the app as `imagegen serve` does ("serve") or under a plain uvicorn ("uvicorn"); its address."""
    servers: list[LiveServer] = []

    def run(kind: str = "serve", **overrides: Any) -> str:
        factories, _ = fake_factory(step_delay=0.2)
        settings = make_settings(**{**LIMITS, **overrides})
        app = create_app(settings, backend_factories=factories, default_backend="fake")
        if kind == "serve":
            server = LiveServer(app, server_config(app, settings, port=0, log_level="warning"))
        else:
            server = LiveServer(app, timeout_keep_alive=settings.keepalive_timeout)
        servers.append(server.__enter__())
        with httpx.Client(base_url=server.url) as client:
            wait_ready(client)
        return server.url.removeprefix("http://")

    yield run
    for server in servers:
        server.__exit__(None, None, None)


def connect(address: str) -> socket.socket:
    host, port = address.split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (seconds from
    now; `timeout` plus a little if it never did)."""
    started = time.monotonic()
    sock.settimeout(0.05)
    data = b""
    while time.monotonic() - started < timeout:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - started


def trickle(sock: socket.socket, data: bytes, every: float, stop: threading.Event) -> threading.Thread:
    """Send `data` a byte at a time, `every` seconds apart, until done, stopped or refused."""

    def run() -> None:
        for index in range(len(data)):
            if stop.wait(every):
                return
            try:
                sock.sendall(data[index : index + 1])
            except OSError:
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def read_response(sock: socket.socket) -> bytes:
    """One whole /health/live answer (headers and body may come in separate packets)."""
    data = b""
    while b'"alive"}' not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


def test_a_connection_that_sends_nothing_is_closed(start: Callable[..., str]) -> None:
    address = start()
    with connect(address) as sock:
        data, closed_after = read_until_closed(sock, timeout=8)
    assert closed_after < 4, "an idle new connection was held open"
    assert status_of(data) == 408


def test_headers_trickling_in_do_not_extend_their_deadline(start: Callable[..., str]) -> None:
    address = start()
    stop = threading.Event()
    with connect(address) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        trickle(sock, b"X-Slow: " + b"a" * 200, every=0.1, stop=stop)  # a byte every 0.1 s, for 20 s
        data, closed_after = read_until_closed(sock, timeout=10)
        stop.set()
    assert closed_after < 4
    assert status_of(data) == 408


def test_the_next_request_on_a_kept_alive_connection_has_a_header_deadline(start: Callable[..., str]) -> None:
    address = start(keepalive_timeout=30)  # the keep-alive timer cannot be what closes it
    stop = threading.Event()
    with connect(address) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(read_response(sock)) == 200
        sock.sendall(b"GET /health/live HTTP/1.1\r\n")
        trickle(sock, b"X-Slow: " + b"a" * 200, every=0.1, stop=stop)
        data, closed_after = read_until_closed(sock, timeout=10)
        stop.set()
    assert closed_after < 4
    assert status_of(data) == 408


def test_an_idle_kept_alive_connection_is_closed(start: Callable[..., str]) -> None:
    address = start(header_timeout=30)
    with connect(address) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(read_response(sock)) == 200
        data, closed_after = read_until_closed(sock, timeout=8)
    assert data == b"" and closed_after < 4  # SD_KEEPALIVE_TIMEOUT=1


@pytest.mark.parametrize("kind", ["serve", "uvicorn"])
def test_a_slow_body_is_answered_408(start: Callable[..., str], kind: str) -> None:
    address = start(kind)
    body = b'{"prompt": "' + b"a" * 300 + b'"}'
    stop = threading.Event()
    with connect(address) as sock:
        sock.sendall(
            b"POST /api/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:10]
        )
        trickle(sock, body[10:], every=0.1, stop=stop)  # 30 s at this pace
        data, closed_after = read_until_closed(sock, timeout=10)
        stop.set()
    assert closed_after < 4
    assert status_of(data) == 408
    assert b'"type":"request_timeout"' in data and b"SD_BODY_TIMEOUT" in data


def test_a_body_nobody_reads_cannot_hold_the_connection(start: Callable[..., str]) -> None:
    """A route answers without reading the body (405 here; a 401 does the same): the client keeps
    sending, a byte at a time, on a kept-alive connection."""
    address = start()
    stop = threading.Event()
    with connect(address) as sock:
        sock.sendall(
            b"POST /health/live HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{"
        )
        trickle(sock, b"a" * 499, every=0.1, stop=stop)
        data, closed_after = read_until_closed(sock, timeout=12)
        stop.set()
    assert status_of(data) == 405
    assert closed_after < 6  # SD_BODY_TIMEOUT=1 plus the grace the app's own 408 gets


def _is_open(sock: socket.socket) -> bool:
    sock.settimeout(0)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def test_open_connections_are_bounded_and_new_clients_still_get_in(start: Callable[..., str]) -> None:
    address = start(header_timeout=60)  # no timeout helps here: only the bound
    idle = [connect(address) for _ in range(40)]
    try:
        time.sleep(0.3)
        # A new client is served at once: the connections that waited longest made room for it.
        for _ in range(5):
            started = time.monotonic()
            response = httpx.get(f"http://{address}/health/live", timeout=5)
            assert response.status_code == 200 and time.monotonic() - started < 1
        time.sleep(0.3)
        still_open = sum(_is_open(sock) for sock in idle)
        assert still_open <= 16
        assert not any(_is_open(sock) for sock in idle[:20])  # the oldest went first
    finally:
        for sock in idle:
            sock.close()


def test_a_server_full_of_busy_connections_refuses_the_next_one(start: Callable[..., str]) -> None:
    address = start(max_connections=16, shutdown_grace=0)  # the jobs hang: no grace for them at the end
    busy = []
    try:
        for index in range(16):
            sock = connect(address)
            body = b'{"prompt": "hang %d"}' % index
            sock.sendall(
                b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            busy.append(sock)
        # Job submissions answer at once: make them busy with what does not end: the events streams.
        time.sleep(0.5)
        for sock in busy:
            sock.settimeout(5)
            answer = sock.recv(65536)
            assert status_of(answer) == 202, answer[:200]
            job_id = answer.split(b'"id":"', 1)[1].split(b'"', 1)[0].decode()
            sock.sendall(f"GET /api/jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(0.5)
        with connect(address) as extra:
            extra.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            data, _ = read_until_closed(extra, timeout=5)
        assert status_of(data) == 503
    finally:
        for sock in busy:
            sock.close()


def test_imagegen_serve_runs_the_guarded_protocol(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(**LIMITS)
    config = server_config(object(), settings)
    assert isinstance(config.http, type) and issubclass(config.http, GuardedH11Protocol)
    assert config.http.limits.header_timeout == 1.0 and config.http.limits.max_connections == 16
    assert config.timeout_keep_alive == 1 and config.access_log is False
