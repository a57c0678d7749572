"""Logs: one line per request and per job state change, with ids, backend and timings; JSON on
request; never a key, and never a prompt at info level."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx

from imagegen.logging_setup import ServiceLogHandler

PROMPT_CANARY = "prompt-canary-4471 my password is hunter2"
KEY_CANARY = "key-canary-9913"


def capture_service_log(client: httpx.Client) -> io.StringIO:
    """Point the handler create_app installed (format, request-id filter and all) at a buffer."""
    buffer = io.StringIO()
    handlers = [h for h in logging.getLogger("imagegen").handlers if isinstance(h, ServiceLogHandler)]
    assert len(handlers) == 1
    handlers[0].setStream(buffer)
    return buffer


def wait_for(log: io.StringIO, text: str, timeout: float = 5.0) -> str:
    """The log once `text` is in it: the access line is written when the response has been sent."""
    deadline = time.monotonic() + timeout
    while text not in log.getvalue():
        assert time.monotonic() < deadline, f"{text!r} never logged"
        time.sleep(0.01)
    return log.getvalue()


def _json_lines(text: str) -> list[dict]:  # type: ignore[type-arg]
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_json_lines_for_requests_and_jobs_without_secrets(
    serve: Callable[..., httpx.Client],
    fake_factory,  # type: ignore[no-untyped-def]
) -> None:
    factories, _ = fake_factory()
    client = serve(
        factories=factories,
        default_backend="fake",
        log_format="json",
        log_level="info",
        api_key=KEY_CANARY,
        headers={"X-API-Key": KEY_CANARY},
    )
    log = capture_service_log(client)
    response = client.post(
        "/api/txt2img", json={"prompt": PROMPT_CANARY, "seed": 4}, headers={"X-Request-ID": "req-abc-1"}
    )
    assert response.status_code == 200
    job_id = response.json()["id"]
    client.post("/api/txt2img", json={"prompt": "fail " + PROMPT_CANARY, "seed": 5})
    client.get("/info", headers={"X-API-Key": "wrong-" + KEY_CANARY})
    text = wait_for(log, "GET /info 401")
    assert PROMPT_CANARY not in text and "hunter2" not in text
    assert KEY_CANARY not in text
    lines = _json_lines(text)
    assert lines, text[-2000:]

    access = [line for line in lines if line["logger"] == "imagegen.access" and line["request_id"] == "req-abc-1"]
    assert len(access) == 1
    assert access[0]["route"] == "/api/txt2img" and access[0]["status_code"] == 200
    assert access[0]["method"] == "POST" and access[0]["duration_ms"] > 0

    job_lines = [line for line in lines if line.get("job_id") == job_id]
    assert [line["status"] for line in job_lines] == ["queued", "running", "succeeded"]
    assert all(line["backend"] == "fake" for line in job_lines)
    # The queued and final lines name the request (the running line is one per batch, from a worker).
    assert [line["request_id"] for line in job_lines] == ["req-abc-1", "-", "req-abc-1"]
    final = job_lines[-1]
    assert final["queued_ms"] >= 0 and final["run_ms"] > 0

    failed = [line for line in lines if line.get("status") == "failed"]
    assert failed and failed[0]["error_type"] == "generation_failed"
    unauthorized = [line for line in lines if line.get("status_code") == 401]
    assert unauthorized and unauthorized[0]["route"] == "/info"


def test_text_lines_carry_the_same_facts(
    serve: Callable[..., httpx.Client],
    fake_factory,  # type: ignore[no-untyped-def]
) -> None:
    factories, _ = fake_factory()
    client = serve(factories=factories, default_backend="fake", log_level="info")
    log = capture_service_log(client)
    job_id = client.post("/api/txt2img", json={"prompt": PROMPT_CANARY, "seed": 4}).json()["id"]
    text = wait_for(log, "POST /api/txt2img 200")
    assert PROMPT_CANARY not in text
    final = [line for line in text.splitlines() if f"job={job_id} succeeded" in line]
    assert len(final) == 1 and "backend=fake" in final[0] and "queued=" in final[0] and "run=" in final[0]
    assert any("POST /api/txt2img 200" in line for line in text.splitlines())


# -- log forgery: nothing a caller sends can write a line of its own or reach a terminal raw -------------

#: A request path that, decoded, holds a forged access line after a newline, and every kind of control
#: character: CR, ESC (a colour sequence), BEL, NUL, DEL, a C1 CSI, and the Unicode line separator.
FORGED_LINE = "2026-01-01T00:00:00 INFO imagegen.access [-] GET /api/jobs 200 1.0ms"
FORGERY_PATH = "/api/jobs%0a" + FORGED_LINE.replace(" ", "%20") + "%0d%0a%1b[31mred%07%00%7f%c2%9bcsi%e2%80%a8sep%09tab"
#: Every character that must never reach the log raw (newlines end lines; nothing else may).
CONTROL = {chr(code) for code in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]}


def _raw_controls(text: str) -> set[str]:
    return {char for char in text if char in CONTROL}


def test_a_path_cannot_forge_a_text_line(
    serve: Callable[..., httpx.Client],
    fake_factory,  # type: ignore[no-untyped-def]
) -> None:
    factories, _ = fake_factory()
    client = serve(factories=factories, default_backend="fake", log_level="info", api_key=KEY_CANARY)
    log = capture_service_log(client)
    response = client.get(FORGERY_PATH)  # no key: the real answer is 401
    assert response.status_code == 401
    text = wait_for(log, " 401 ")
    lines = text.splitlines()
    access = [line for line in lines if "imagegen.access" in line]
    assert len(access) == 1, access  # the forged "200" is not a line of its own
    (line,) = access
    assert line.endswith("ms") and " 401 " in line
    assert "\\n2026-01-01T00:00:00 INFO imagegen.access" in line  # the forged text, escaped, inside
    assert "\\x1b[31m" in line and "\\x07" in line and "\\x00" in line and "\\x7f" in line
    assert "\\x9b" in line and "\\u2028" in line and "\\t" in line and "\\r" in line
    assert not [item for item in lines if item.startswith(FORGED_LINE)]
    assert _raw_controls(text.replace("\n", "")) == set()


def test_json_fields_are_escaped_too(
    serve: Callable[..., httpx.Client],
    fake_factory,  # type: ignore[no-untyped-def]
) -> None:
    factories, _ = fake_factory()
    client = serve(factories=factories, default_backend="fake", log_level="info", log_format="json")
    log = capture_service_log(client)
    assert client.get(FORGERY_PATH).status_code == 404
    text = wait_for(log, '"status_code": 404')
    assert len(text.splitlines()) == len(_json_lines(text))  # every physical line is one JSON object
    (access,) = [line for line in _json_lines(text) if line["logger"] == "imagegen.access"]
    # Decoded, the fields still hold no control character: a consumer printing one prints one line.
    for field in ("message", "path"):
        assert _raw_controls(access[field]) == set(), access[field]
        assert "\\n2026-01-01T00:00:00" in access[field] and "\\x1b[31m" in access[field]
    assert access["route"] == "unmatched"


def test_a_traceback_stays_under_its_line() -> None:
    """An exception message carrying a forged line: each traceback line is indented and escaped."""
    import logging as _logging

    from imagegen.logging_setup import TextFormatter

    try:
        raise ValueError("bad input\n" + FORGED_LINE + "\x1b[2J")
    except ValueError:
        record = _logging.LogRecord("imagegen.api", _logging.ERROR, __file__, 1, "failed %s", ("x\ny",), None)
        import sys

        record.exc_info = sys.exc_info()
    record.request_id = "-"
    text = TextFormatter().format(record)
    first, *rest = text.split("\n")
    assert first.endswith("failed x\\ny")
    assert rest and all(line.startswith("    ") for line in rest)
    assert not [line for line in rest if line.startswith(FORGED_LINE)]
    assert "\\x1b[2J" in text and "\x1b" not in text


def test_the_servers_own_access_log_is_escaped(
    make_settings: Callable[..., Any],
    fake_factory,  # type: ignore[no-untyped-def]
) -> None:
    """`uvicorn imagegen.main:app` keeps uvicorn's access log on: its client address comes from
    X-Forwarded-For (trusted from loopback), which may carry C1 characters and tabs."""
    from uvicorn.logging import AccessFormatter

    from imagegen.main import create_app
    from tests.support.server import LiveServer

    factories, _ = fake_factory()
    app = create_app(make_settings(), backend_factories=factories, default_backend="fake")
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    keep = Keep()
    keep.setFormatter(AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False))
    with LiveServer(app, log_level="info", access_log=True, proxy_headers=True) as server:
        logging.getLogger("uvicorn.access").addHandler(keep)
        try:
            forwarded = b"203.0.113.9\x9b[31m\tforged"
            response = httpx.get(server.url + "/health/live", headers={"X-Forwarded-For": forwarded})
            assert response.status_code == 200
            deadline = time.monotonic() + 5
            while not lines and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            logging.getLogger("uvicorn.access").removeHandler(keep)
    assert lines, "uvicorn's access log wrote nothing"
    assert "\\x9b[31m\\tforged" in lines[0]
    assert _raw_controls(lines[0]) == set()
