"""Logs: one line per request and per job state change, with ids, backend and timings; JSON on
request; never a key, and never a prompt at info level."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable

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
