"""Webhooks: the final job body POSTed to callback_url, signed, retried, never redirected, and never
sent to metadata or link-local addresses (SSRF: LocalAI/vLLM CVEs, bypasses through redirects)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from imagegen.config import Settings
from imagegen.engine.jobs import Job, JobStatus
from imagegen.engine.store import SQLiteJobStore
from imagegen.engine.webhooks import SIGNATURE_HEADER, WebhookSender
from imagegen.errors import InvalidParameterError
from tests.engine.test_jobs_api import wait_status
from tests.support.server import LiveServer

SECRET = "whsec-canary-9f2"


class Receiver:
    """A webhook receiver on loopback that answers with a scripted sequence of statuses."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.script: list[int] = []
        self.app = Starlette(
            routes=[
                Route("/hook", self.hook, methods=["POST"]),
                Route("/target", self.target, methods=["POST", "GET"]),
            ]
        )

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        self.received.append({"path": "/hook", "headers": dict(request.headers), "body": body})
        status = self.script.pop(0) if self.script else 200
        if status == 302:
            return RedirectResponse("/target", status_code=302)
        return JSONResponse({"ok": status < 300}, status_code=status)

    async def target(self, request: Request) -> Response:
        self.received.append({"path": "/target", "headers": dict(request.headers), "body": await request.body()})
        return JSONResponse({})


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    hook = Receiver()
    with LiveServer(hook.app) as server:
        yield hook, server.url


@pytest.fixture
def client(serve: Callable[..., httpx.Client], fake_factory) -> httpx.Client:
    factories, _ = fake_factory()
    return serve(factories=factories, default_backend="fake", webhook_secret=SECRET, webhook_backoff=0.05)


def wait_webhook(client: httpx.Client, job_id: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/api/jobs/{job_id}", params={"include_images": "false"}).json()
        if body["webhook"] and body["webhook"]["status"] != "pending":
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def test_final_body_is_posted_and_signed(client: httpx.Client, receiver: tuple[Receiver, str]) -> None:
    hook, url = receiver
    job = client.post("/api/jobs", json={"prompt": "notify me", "seed": 4, "callback_url": f"{url}/hook"}).json()
    done = wait_webhook(client, job["id"])
    assert done["webhook"]["status"] == "delivered" and done["webhook"]["attempts"] == 1
    (call,) = hook.received
    body = json.loads(call["body"])
    assert body["id"] == job["id"] and body["status"] == "succeeded"
    assert body["result"]["images"][0]["seed"] == 4 and body["result"]["images"][0]["b64"]
    expected = "sha256=" + hmac.new(SECRET.encode(), call["body"], hashlib.sha256).hexdigest()
    assert call["headers"][SIGNATURE_HEADER.lower()] == expected
    assert call["headers"]["x-imagegen-event"] == "job.succeeded"
    assert SECRET not in call["body"].decode()


def test_failed_jobs_are_delivered_too(client: httpx.Client, receiver: tuple[Receiver, str]) -> None:
    hook, url = receiver
    job = client.post("/api/jobs", json={"prompt": "fail", "callback_url": f"{url}/hook"}).json()
    wait_webhook(client, job["id"])
    body = json.loads(hook.received[0]["body"])
    assert body["status"] == "failed" and body["error"]["type"] == "generation_failed"


def test_transient_failures_are_retried_with_backoff(client: httpx.Client, receiver: tuple[Receiver, str]) -> None:
    hook, url = receiver
    hook.script = [500, 503, 200]
    job = client.post("/api/jobs", json={"prompt": "retry", "callback_url": f"{url}/hook"}).json()
    done = wait_webhook(client, job["id"])
    assert done["webhook"]["status"] == "delivered" and done["webhook"]["attempts"] == 3
    assert len(hook.received) == 3
    assert len({call["body"] for call in hook.received}) == 1  # the same signed body each time


def test_retries_are_bounded(client: httpx.Client, receiver: tuple[Receiver, str]) -> None:
    hook, url = receiver
    hook.script = [503] * 10
    job = client.post("/api/jobs", json={"prompt": "never", "callback_url": f"{url}/hook"}).json()
    done = wait_webhook(client, job["id"])
    assert done["webhook"]["status"] == "failed" and done["webhook"]["attempts"] == 5
    assert done["webhook"]["last_error"] == "HTTP 503"


def test_client_errors_are_not_retried(client: httpx.Client, receiver: tuple[Receiver, str]) -> None:
    hook, url = receiver
    hook.script = [404]
    job = client.post("/api/jobs", json={"prompt": "gone", "callback_url": f"{url}/hook"}).json()
    assert wait_webhook(client, job["id"])["webhook"]["attempts"] == 1


def test_redirects_are_never_followed(client: httpx.Client, receiver: tuple[Receiver, str]) -> None:
    hook, url = receiver
    hook.script = [302]
    job = client.post("/api/jobs", json={"prompt": "redirect", "callback_url": f"{url}/hook"}).json()
    done = wait_webhook(client, job["id"])
    assert done["webhook"]["status"] == "failed" and "redirect" in done["webhook"]["last_error"]
    assert [call["path"] for call in hook.received] == ["/hook"]


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/x",
        "http://metadata.google.internal/x",
        "http://[fd00:ec2::254]/",
        "http://[::ffff:169.254.169.254]/",
        "ftp://example.com/x",
        "file:///etc/passwd",
        "http://user:pass@example.com/x",
        "http:///nohost",
        "not a url",
        "http://0.0.0.0/x",
        "http://224.0.0.1/x",
    ],
)
def test_refused_destinations_are_rejected_at_submit(client: httpx.Client, url: str) -> None:
    response = client.post("/api/jobs", json={"prompt": "x", "callback_url": url})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "callback_url"


def test_allowlist_restricts_hosts(serve: Callable[..., httpx.Client], fake_factory, receiver) -> None:
    _, url = receiver
    factories, _ = fake_factory()
    client = serve(
        factories=factories,
        default_backend="fake",
        webhook_allowed_hosts="n8n.internal",
        webhook_max_attempts=1,
        webhook_timeout=1,
    )
    refused = client.post("/api/jobs", json={"prompt": "x", "callback_url": f"{url}/hook"})
    assert refused.status_code == 422 and "SD_WEBHOOK_ALLOWED_HOSTS" in refused.json()["error"]["message"]
    accepted = client.post("/api/jobs", json={"prompt": "x", "callback_url": "http://n8n.internal:5678/webhook/abc"})
    assert accepted.status_code == 202


def test_a_host_that_resolves_to_link_local_is_refused_at_delivery(tmp_path, receiver) -> None:
    hook, _url = receiver

    async def rebinding_resolver(host: str, port: int) -> list[Any]:
        return [(2, 1, 6, "", ("169.254.169.254", port))]

    async def scenario() -> dict[str, Any]:
        settings = Settings(_env_file=None, webhook_backoff=0.01)
        sender = WebhookSender(settings, lambda job: {"id": job.id}, resolver=rebinding_resolver)
        store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
        from imagegen.generation import GenerationRequest

        request = GenerationRequest(
            backend="fake",
            model="m",
            prompt="p",
            negative_prompt=None,
            width=8,
            height=8,
            steps=1,
            guidance_scale=None,
            scheduler=None,
            seeds=(1,),
            output_format="png",
        )
        job = Job(
            id="a" * 32, request=request, status=JobStatus.SUCCEEDED, callback_url="http://hooks.example.com/hook"
        )
        store.add(job)
        sender.validate(job.callback_url)  # the name itself is fine...
        await sender.deliver(job, store)
        await sender.close()
        return store.get(job.id).webhook  # type: ignore[union-attr]

    state = asyncio.run(scenario())
    assert state["status"] == "failed" and "link-local" in state["last_error"]  # ...its address is not
    assert hook.received == []


def test_validate_raises_a_422_error_type() -> None:
    sender_settings = Settings(_env_file=None)

    async def check() -> None:
        sender = WebhookSender(sender_settings, lambda job: {})
        with pytest.raises(InvalidParameterError):
            sender.validate("gopher://x")
        await sender.close()

    asyncio.run(check())


def test_no_webhook_without_callback(client: httpx.Client, receiver) -> None:
    hook, _ = receiver
    job = client.post("/api/jobs", json={"prompt": "quiet"}).json()
    assert wait_status(client, job["id"], {"succeeded"})["webhook"] is None
    assert hook.received == []


def test_a_delivery_that_gives_up_is_a_warning_with_iso_timestamps(
    client: httpx.Client, receiver: tuple[Receiver, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A caller (an n8n Wait node) now waits forever: the operator must see it at the default level;
    and the delivery's time reads like every other timestamp of the job."""
    import logging

    hook, url = receiver
    hook.script = [404]
    logger = logging.getLogger("imagegen")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="imagegen"):
            lost = client.post("/api/jobs", json={"prompt": "lost", "callback_url": f"{url}/hook"}).json()
            failed = wait_webhook(client, lost["id"])  # the script's 404: not retried
            ok = client.post("/api/jobs", json={"prompt": "ok", "callback_url": f"{url}/hook"}).json()
            delivered = wait_webhook(client, ok["id"])
    finally:
        logger.removeHandler(caplog.handler)
    lines = {record.getMessage(): record.levelname for record in caplog.records if "webhook" in record.getMessage()}
    assert lines[f"job={delivered['id']} webhook delivered attempts=1"] == "INFO"
    assert lines[f"job={failed['id']} webhook failed attempts=1 error=HTTP 404"] == "WARNING"
    for body in (delivered, failed):
        stamp = body["webhook"]["finished_at"]
        assert isinstance(stamp, str) and len(stamp) == len(body["finished_at"]) and stamp.endswith("Z")
        assert stamp >= body["finished_at"]
