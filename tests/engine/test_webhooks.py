"""Webhooks: the final job body POSTed to callback_url, signed, retried, never redirected, and never
sent to metadata or link-local addresses (SSRF: LocalAI/vLLM CVEs, bypasses through redirects), nor to
loopback and private ones unless the operator allows them; one parser decides at submit and at send,
so an accepted URL can always be sent; deliveries survive a restart; failures read the same to the
caller whatever the receiver did (no port-scan oracle)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
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
from imagegen.engine.webhooks import DELIVERY_FAILED, SIGNATURE_HEADER, WebhookSender
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
    # The receiver listens on loopback: allowed explicitly (the default refuses private targets).
    factories, _ = fake_factory()
    return serve(
        factories=factories,
        default_backend="fake",
        webhook_secret=SECRET,
        webhook_backoff=0.05,
        webhook_allow_private=True,
    )


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
    assert done["webhook"]["last_error"] == DELIVERY_FAILED  # the receiver's status stays in the log


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
    assert done["webhook"]["status"] == "failed" and done["webhook"]["attempts"] == 1
    assert done["webhook"]["last_error"] == DELIVERY_FAILED
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


# -- one parser at submit and at send: an accepted URL can always be sent ----------------------------------

#: URLs a resolver or the sending client would read differently from a plain URL parser: numeric forms
#: of 127.0.0.1, whitespace and control characters in the host, credentials, zones, bad ports.
UNSENDABLE = [
    "http://0177.0.0.1/hook",  # octal
    "http://0x7f.1/hook",  # hex, short form
    "http://0x7f000001/hook",
    "http://2130706433/hook",  # one decimal number
    "http://017700000001/hook",
    "http://127.1/hook",  # short dotted form
    "http://1.2.3/hook",
    "http://exa\tmple.com/hook",
    "http://exa\nmple.com/hook",
    "http://example.com\r\n.evil/hook",
    "http://example.com /hook",
    "http://ex%41mple.com/hook",
    "http://user@example.com/hook",
    "http://@example.com/hook",
    "http://[fe80::1%25eth0]/hook",
    "http://example.com:99999/hook",
    "http://example.com:0/hook",
    "http://[::1/hook",
    "http://exa_mple..com/hook",
]


@pytest.mark.parametrize("url", UNSENDABLE)
def test_urls_the_sender_could_not_send_as_checked_are_refused_at_submit(client: httpx.Client, url: str) -> None:
    # Even with private targets allowed (the client fixture): these are refused for their form.
    response = client.post("/api/jobs", json={"prompt": "x", "callback_url": url})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "callback_url"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:5678/hook",
        "http://[::1]:5678/hook",  # one rule for both loopbacks
        "http://localhost:5678/hook",
        "http://n8n.localhost/hook",
        "http://10.0.0.7/hook",
        "http://172.16.0.1/hook",
        "http://192.168.1.20:5678/hook",
        "http://100.64.0.1/hook",
        "http://[fd00::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[::ffff:10.0.0.1]/hook",
        "http://[64:ff9b::7f00:1]/hook",  # NAT64 of 127.0.0.1
        "http://[2002:7f00:1::]/hook",  # 6to4 of 127.0.0.1
    ],
)
def test_loopback_and_private_targets_are_refused_by_default(
    serve: Callable[..., httpx.Client], fake_factory, url: str
) -> None:
    factories, _ = fake_factory()
    client = serve(factories=factories, default_backend="fake")
    response = client.post("/api/jobs", json={"prompt": "x", "callback_url": url})
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "loopback" in message or "private" in message or "this machine" in message, message
    assert "SD_WEBHOOK_ALLOW_PRIVATE" in message


def test_both_loopbacks_follow_one_rule() -> None:
    from imagegen.engine.webhooks import refused_address

    for text in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        address = ipaddress.ip_address(text)
        assert "loopback" in (refused_address(address) or ""), text
        assert refused_address(address, allow_private=True) is None, text
    for text in ("169.254.169.254", "fe80::1", "::", "0.0.0.0", "224.0.0.1", "240.0.0.1", "fd00:ec2::254"):
        assert refused_address(ipaddress.ip_address(text), allow_private=True), text  # never allowed
    assert refused_address(ipaddress.ip_address("93.184.216.34")) is None


def test_private_targets_are_allowed_explicitly(
    serve: Callable[..., httpx.Client], fake_factory, receiver: tuple[Receiver, str]
) -> None:
    _, url = receiver  # http://127.0.0.1:PORT
    port = url.rsplit(":", 1)[1]
    factories, _ = fake_factory()
    listed = serve(factories=factories, default_backend="fake", webhook_allowed_hosts="127.0.0.1,[::1]")
    job = listed.post("/api/jobs", json={"prompt": "listed", "callback_url": f"{url}/hook"})
    assert job.status_code == 202
    assert wait_webhook(listed, job.json()["id"])["webhook"]["status"] == "delivered"
    assert listed.post("/api/jobs", json={"prompt": "x", "callback_url": f"http://[::1]:{port}/h"}).status_code == 202
    everything = serve(factories=factories, default_backend="fake", webhook_allow_private=True)
    for target in (f"{url}/hook", f"http://[::1]:{port}/hook", "http://10.1.2.3/hook"):
        assert everything.post("/api/jobs", json={"prompt": "x", "callback_url": target}).status_code == 202


def _job(callback_url: str, webhook: dict[str, Any] | None = None, job_id: str = "b" * 32) -> Job:
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
    return Job(id=job_id, request=request, status=JobStatus.SUCCEEDED, callback_url=callback_url, webhook=webhook)


def _deliver(tmp_path, job: Job, sender_options: dict[str, Any], **settings: Any) -> dict[str, Any]:
    async def scenario() -> dict[str, Any]:
        sender = WebhookSender(Settings(_env_file=None, webhook_backoff=0.01, **settings), **sender_options)
        store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
        store.add(job)
        await sender.deliver(job, store)
        await sender.close()
        stored = store.get(job.id)
        assert stored is not None and stored.webhook is not None
        return stored.webhook

    return asyncio.run(scenario())


def test_a_listed_host_may_resolve_to_a_private_address(tmp_path, receiver) -> None:
    """n8n on a Docker network: its name resolves to 172.x; listing the host allows it, nothing else does."""
    hook, url = receiver
    port = int(url.rsplit(":", 1)[1])

    async def docker_dns(host: str, _port: int) -> list[Any]:
        return [(2, 1, 6, "", ("127.0.0.1", port))]

    render = {"render": lambda job: {"id": job.id}, "resolver": docker_dns}
    listed = _deliver(tmp_path / "a", _job(f"http://n8n:{port}/hook"), render, webhook_allowed_hosts="n8n")
    assert listed["status"] == "delivered" and len(hook.received) == 1
    unlisted = _deliver(tmp_path / "b", _job(f"http://n8n:{port}/hook"), render)
    assert unlisted["status"] == "failed" and "resolves to a loopback address" in unlisted["last_error"]
    assert len(hook.received) == 1


def test_an_error_inside_a_delivery_is_recorded_as_failed(tmp_path) -> None:
    def broken_render(job: Job) -> dict[str, Any]:
        raise RuntimeError("the body could not be built")

    state = _deliver(tmp_path, _job("http://hooks.example.com/hook"), {"render": broken_render})
    assert state["status"] == "failed" and state["last_error"] == DELIVERY_FAILED


def test_a_url_refused_at_delivery_is_recorded_as_failed(tmp_path) -> None:
    """A job stored under other rules (an older version, other settings) that the sender cannot send."""
    state = _deliver(tmp_path, _job("http://0177.0.0.1/hook"), {"render": lambda job: {}})
    assert state == {**state, "status": "failed", "attempts": 1}
    assert state["last_error"].startswith("refused: ")


def test_failures_read_the_same_whatever_the_receiver_did(
    serve: Callable[..., httpx.Client], fake_factory, receiver: tuple[Receiver, str]
) -> None:
    """An answered 401 and a closed port must not be told apart by the caller (a port-scan oracle)."""
    from tests.support.process import free_port

    hook, url = receiver
    hook.script = [401]
    factories, _ = fake_factory()
    client = serve(factories=factories, default_backend="fake", webhook_allow_private=True, webhook_max_attempts=1)
    answered = client.post("/api/jobs", json={"prompt": "x", "callback_url": f"{url}/hook"}).json()["id"]
    closed = client.post(
        "/api/jobs", json={"prompt": "x", "callback_url": f"http://127.0.0.1:{free_port()}/hook"}
    ).json()["id"]
    states = [wait_webhook(client, job_id)["webhook"] for job_id in (answered, closed)]
    assert len(hook.received) == 1
    for state in states:
        assert state["status"] == "failed" and state["attempts"] == 1 and state["last_error"] == DELIVERY_FAILED
        assert set(state) == {"status", "attempts", "last_error", "finished_at"}


def test_a_pending_delivery_is_stored_with_the_final_state(tmp_path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    pending = _job("http://hooks.example.com/a", WebhookSender.pending_state(), job_id="c" * 32)
    store.add(pending)
    store.add(_job("http://hooks.example.com/b", {"status": "delivered", "attempts": 1}, job_id="d" * 32))
    store.add(_job("http://hooks.example.com/c", None, job_id="e" * 32))
    assert [job.id for job in store.pending_webhooks()] == [pending.id]


@pytest.mark.slow
def test_a_delivery_still_retrying_when_the_process_dies_is_resumed_after_restart(
    service, receiver: tuple[Receiver, str]
) -> None:
    import signal

    hook, url = receiver
    hook.script = [503]  # the first attempt fails; the next one, after the restart, succeeds
    env = {
        "SD_WEBHOOK_ALLOW_PRIVATE": "true",
        "SD_WEBHOOK_SECRET": SECRET,
        "SD_WEBHOOK_BACKOFF": "600",  # the second attempt would wait ten minutes in this process
        "FAKE_STEP_DELAY": "0.001",
    }
    first = service(**env)
    client = first.start()
    job_id = client.post("/api/jobs", json={"prompt": "resume me", "seed": 3, "callback_url": f"{url}/hook"}).json()[
        "id"
    ]
    deadline = time.monotonic() + 30
    while (client.get(f"/api/jobs/{job_id}", params={"include_images": "false"}).json()["webhook"] or {}).get(
        "attempts"
    ) != 1:
        assert time.monotonic() < deadline, "the first attempt was never recorded"
        time.sleep(0.05)
    first.kill(signal.SIGKILL)
    assert len(hook.received) == 1

    client = service(**env).start()
    done = wait_webhook(client, job_id, timeout=30)
    assert done["webhook"]["status"] == "delivered" and done["webhook"]["attempts"] == 2
    assert len(hook.received) == 2
    resent = hook.received[1]
    body = json.loads(resent["body"])
    assert body["id"] == job_id and body["status"] == "succeeded" and body["result"]["images"][0]["b64"]
    assert resent["headers"][SIGNATURE_HEADER.lower()] == sign_body(resent["body"])


def sign_body(body: bytes) -> str:
    return "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


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
