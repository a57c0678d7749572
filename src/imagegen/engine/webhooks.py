"""Webhook delivery: POST the final job body to the job's callback_url (n8n's Wait node resume URL).

Outbound URLs come from requests, so they are treated as hostile (SSRF). One parser,
`parse_callback` (httpx's, the one that sends), decides at submit (422) and again before every
attempt, so a URL that was accepted is a URL that can be sent:
- http(s) only; no credentials; no whitespace or control character anywhere; a port in 1..65535;
- the host is a standard IP literal (dotted-quad IPv4, bracketed IPv6) or a DNS name; numeric forms
  that the C resolver reads as addresses (`0177.0.0.1`, `0x7f.1`, `127.1`, `2130706433`) are refused,
  since they would hide an address from the rules below;
- cloud-metadata names and addresses, link-local, multicast, unspecified and reserved addresses are
  refused always; loopback, private and other non-global addresses (10/8, 192.168/16, fc00::/7,
  100.64/10, `localhost`, ...) are refused unless SD_WEBHOOK_ALLOW_PRIVATE=true or the host is listed
  in SD_WEBHOOK_ALLOWED_HOSTS; addresses inside IPv6 (mapped, 6to4, NAT64) are judged as the IPv4
  address they carry; when SD_WEBHOOK_ALLOWED_HOSTS is set, only its hosts are allowed;
- the resolved address is checked by the same rules and pinned for the connection (no DNS rebinding
  between check and use); redirects are never followed; short timeouts; bounded retries.
The body is signed with HMAC-SHA256 under SD_WEBHOOK_SECRET.

Deliveries are durable: a job that ends with a callback is stored as `webhook.status = "pending"` in
the same write as its final state, each attempt updates its count, and start-up resumes the pending
ones (after a crash or a restart). A delivery ends `delivered` or `failed` with its attempts; an
error inside a delivery fails it, never silently. What a caller reads of a failure is coarse
("delivery failed", or which rule refused the URL): whether a port is closed or answered 401 would
make the service a port scanner. The service log has the details.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from imagegen.config import Settings
from imagegen.engine.jobs import Job
from imagegen.engine.store import JobStore
from imagegen.errors import InvalidParameterError
from imagegen.retry import backoff_delay

log = logging.getLogger("imagegen.webhooks")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[Any]]]

SIGNATURE_HEADER = "X-Imagegen-Signature"
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "metadata.azure.internal", "instance-data"})
# Cloud metadata services that are not link-local addresses.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address) for address in ("fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
#: Names that mean this machine (RFC 6761 reserves *.localhost too).
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
#: The longest wait between two attempts (the first is SD_WEBHOOK_BACKOFF, doubling after each).
_MAX_BACKOFF = 60.0
#: What a caller reads of an attempt that reached nothing, or a receiver that did not accept the body.
DELIVERY_FAILED = "delivery failed"
#: Seconds a delivery in flight gets to finish at shutdown; the others stay pending for the next start.
_CLOSE_WAIT = 5.0

# A DNS label (underscores allowed: Compose service names have them); IDNs arrive as xn-- labels.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
# What inet_aton reads as a number: decimal, octal (leading 0) or hex (0x) parts.
_NUMERIC_PART = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")
_PRIVATE_HINT = "set SD_WEBHOOK_ALLOW_PRIVATE=true or list the host in SD_WEBHOOK_ALLOWED_HOSTS"


class WebhookRefusedError(Exception):
    pass


class JobRecorder(Protocol):
    """Where a delivery's outcome (`job.webhook`) is written: the job store (engine/store.py), or in a
    cluster nothing (the replica that delivered writes it to Redis afterwards)."""

    def update(self, job: Job) -> None: ...


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class CallbackTarget:
    """A callback URL as the sender will use it."""

    url: httpx.URL
    scheme: str
    #: lower case, IDNA-encoded, without brackets or a trailing dot
    host: str
    port: int
    #: the host as an address when it is an IP literal
    literal: IPAddress | None


def parse_callback(url: str) -> CallbackTarget:
    """Parse with the parser that sends, and refuse whatever it would send somewhere other than what
    the checks saw. Raises WebhookRefusedError with the rule that refused it."""
    if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in url):
        raise WebhookRefusedError("the URL contains whitespace or control characters")
    try:
        parsed = httpx.URL(url)
        authority = urlsplit(url).netloc
    except (httpx.InvalidURL, ValueError):
        raise WebhookRefusedError("not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise WebhookRefusedError("only http and https URLs are allowed")
    if parsed.userinfo or "@" in authority:
        raise WebhookRefusedError("credentials in the URL are not allowed")
    host = parsed.raw_host.decode("ascii").lower()
    if host.endswith(".") and not host.startswith("["):
        host = host[:-1]
    if not host:
        raise WebhookRefusedError("the URL has no host")
    port = parsed.port if parsed.port is not None else (443 if parsed.scheme == "https" else 80)
    if not 1 <= port <= 65535:
        raise WebhookRefusedError("the port is not in 1..65535")
    return CallbackTarget(parsed, parsed.scheme, host, port, _literal(host))


def _literal(host: str) -> IPAddress | None:
    """The host as an IP address, None for a DNS name; refuses what is neither, and the numeric
    forms that only the C resolver reads as addresses."""
    if ":" in host:  # httpx keeps IPv6 literals (and only them) with colons
        if "%" in host:
            raise WebhookRefusedError("IPv6 zone identifiers are not allowed")
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise WebhookRefusedError("not a valid IPv6 address") from None
    try:
        return ipaddress.IPv4Address(host)
    except ValueError:
        pass
    labels = host.split(".")
    if all(_NUMERIC_PART.fullmatch(label) for label in labels) or labels[-1].isdigit() or _inet_aton_reads(host):
        raise WebhookRefusedError("the host is a number or an IPv4 address in a non-standard form (write a.b.c.d)")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise WebhookRefusedError("the host is not a valid host name")
    return None


def _inet_aton_reads(host: str) -> bool:
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def _carried_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refused_address(address: IPAddress, *, allow_private: bool = False) -> str | None:
    """Why an address may not receive a webhook, or None. One rule for IPv4 and IPv6 (127.0.0.1
    and [::1] alike)."""
    address = _carried_ipv4(address) or address
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_link_local:
        return "a link-local address (cloud metadata lives there)"
    if address.is_multicast or address.is_unspecified:
        return "not a unicast address"
    if address.is_loopback:
        return None if allow_private else f"a loopback address ({_PRIVATE_HINT})"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        return None if allow_private else f"a private address ({_PRIVATE_HINT})"
    return None


@dataclass
class _Attempt:
    delivered: bool = False
    retry: bool = False
    #: what the caller reads (None once delivered)
    public: str | None = None
    #: what the log says
    detail: str = ""
    status: int | None = None


class WebhookSender:
    def __init__(
        self,
        settings: Settings,
        render: Callable[[Job], dict[str, Any]],
        *,
        resolver: Resolver | None = None,
    ) -> None:
        self.settings = settings
        self.render = render
        self._resolver = resolver
        self._allowed = {host.lower().strip("[]").rstrip(".") for host in settings.webhook_allowed_hosts}
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            timeout=httpx.Timeout(settings.webhook_timeout),
            trust_env=False,  # never route callbacks through an environment proxy
        )
        self._warned_unsigned = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._sending: set[str] = set()

    # -- the rules (the same at submit and before every attempt) ---------------------------------
    def validate(self, url: str) -> None:
        """At submit: a 422 naming the rule, or nothing. Cheap: no DNS."""
        try:
            self.check(url)
        except WebhookRefusedError as error:
            raise InvalidParameterError(f"callback_url refused: {error}", param="callback_url") from None

    def check(self, url: str) -> CallbackTarget:
        target = parse_callback(url)
        if target.host in METADATA_HOSTS:
            raise WebhookRefusedError("cloud metadata hosts are not allowed")
        if self._allowed and target.host not in self._allowed:
            raise WebhookRefusedError("the host is not in SD_WEBHOOK_ALLOWED_HOSTS")
        allow_private = self._private_allowed(target)
        if target.literal is not None:
            reason = refused_address(target.literal, allow_private=allow_private)
            if reason:
                raise WebhookRefusedError(f"the host is {reason}")
        elif not allow_private and (target.host in LOOPBACK_NAMES or target.host.endswith(".localhost")):
            raise WebhookRefusedError(f"the host is this machine ({_PRIVATE_HINT})")
        return target

    def _private_allowed(self, target: CallbackTarget) -> bool:
        # A host the operator listed is theirs to send to, wherever it resolves (n8n on a Docker network).
        return self.settings.webhook_allow_private or target.host in self._allowed

    async def _resolve(self, target: CallbackTarget) -> list[IPAddress]:
        if target.literal is not None:
            return [target.literal]
        if self._resolver is not None:
            infos = await self._resolver(target.host, target.port)
        else:
            infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        addresses: list[IPAddress] = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        if not addresses:
            raise OSError("the host does not resolve")
        allow_private = self._private_allowed(target)
        for address in addresses:
            reason = refused_address(address, allow_private=allow_private)
            if reason:
                raise WebhookRefusedError(f"the host resolves to {reason}")
        return addresses

    # -- durable deliveries ----------------------------------------------------------------------
    @staticmethod
    def pending_state() -> dict[str, Any]:
        """The state stored with a job that ends with a callback, in the same write as its end."""
        return {"status": "pending", "attempts": 0, "last_error": None}

    def schedule(self, job: Job, store: JobRecorder) -> None:
        """Deliver in the background (once per job); the task's outcome is always retrieved."""
        if job.id in self._tasks or not job.callback_url:
            return
        task = asyncio.get_running_loop().create_task(self.deliver(job, store), name=f"webhook-{job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(functools.partial(self._finished, job.id))

    def _finished(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.pop(job_id, None)
        if task.cancelled():
            return  # shutdown: still pending in the store, resumed at the next start
        error = task.exception()
        if error is not None:  # deliver() records its own failures; this is a last resort
            log.error("job=%s webhook task failed: %s", job_id, type(error).__name__, exc_info=error)

    def resume(self, store: JobStore) -> int:
        """Schedule every delivery a previous process left pending; how many."""
        pending = [job for job in store.pending_webhooks() if job.callback_url]
        for job in pending:
            self.schedule(job, store)
        if pending:
            log.info("resuming %d pending webhook deliver%s", len(pending), "y" if len(pending) == 1 else "ies")
        return len(pending)

    async def close(self) -> None:
        """Let deliveries in flight finish (briefly); those waiting to retry stay pending in the store."""
        for job_id, task in list(self._tasks.items()):
            if job_id not in self._sending:
                task.cancel()
        tasks = list(self._tasks.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=min(_CLOSE_WAIT, self.settings.webhook_timeout))
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.aclose()

    async def deliver(self, job: Job, store: JobRecorder) -> None:
        """POST the job body; retry transient failures with backoff and jitter; record the outcome.
        Resumes from the attempts already recorded with the job."""
        if not job.callback_url:
            return
        state: dict[str, Any] = {**self.pending_state(), **(job.webhook or {})}
        state["status"] = "pending"
        detail: str | None = None
        try:
            detail = await self._attempts(job, job.callback_url, state, store)
        except asyncio.CancelledError:
            raise  # shutdown: the stored state stays pending, and the next start resumes it
        except Exception:
            log.exception("job=%s webhook delivery failed unexpectedly", job.id)
            state.update(status="failed", last_error=DELIVERY_FAILED)
        state["finished_at"] = time.time()
        job.webhook = state
        store.update(job)
        # A delivery that gave up leaves a caller (an n8n Wait node) waiting: worth an operator's attention.
        # The operator's log names the receiver's answer (HTTP 404); the job's record keeps the generic
        # public text, so that a key holder cannot probe private addresses through it.
        error = detail or state["last_error"]
        log.log(
            logging.INFO if state["status"] == "delivered" else logging.WARNING,
            "job=%s webhook %s attempts=%d%s",
            job.id,
            state["status"],
            state["attempts"],
            f" error={error}" if state["status"] != "delivered" and error else "",
        )

    async def _attempts(self, job: Job, url: str, state: dict[str, Any], store: JobRecorder) -> str | None:
        """Deliver until done or given up; returns what the last failed attempt met (for the log)."""
        max_attempts = self.settings.webhook_max_attempts
        if state["attempts"] >= max_attempts:  # the process stopped after the last attempt
            state["status"] = "failed"
            state["last_error"] = state["last_error"] or DELIVERY_FAILED
            return None
        # The body carries the images in base64: built off the event loop.
        rendered = await asyncio.to_thread(self.render, job)
        body = json.dumps(rendered, separators=(",", ":")).encode("utf-8")
        headers = self._headers(job, body)
        first = state["attempts"] + 1
        for attempt in range(first, max_attempts + 1):
            if attempt > first:
                await asyncio.sleep(backoff_delay(attempt - 2, self.settings.webhook_backoff, cap=_MAX_BACKOFF))
            state["attempts"] = attempt
            self._sending.add(job.id)
            try:
                outcome = await self._attempt(url, body, headers)
            finally:
                self._sending.discard(job.id)
            if outcome.delivered:
                state.update(status="delivered", last_error=None)
                return None
            state["last_error"] = outcome.public
            log.info("job=%s webhook attempt %d/%d: %s", job.id, attempt, max_attempts, outcome.detail)
            if not outcome.retry or attempt == max_attempts:
                state["status"] = "failed"
                return outcome.detail
            job.webhook = dict(state)
            store.update(job)  # a restart resumes from this attempt count
        return None

    def _headers(self, job: Job, body: bytes) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "imagegen-webhook",
            "X-Imagegen-Event": f"job.{job.status.value}",
            "X-Imagegen-Job-Id": job.id,
        }
        if self.settings.webhook_secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.settings.webhook_secret.get_secret_value(), body)
        elif not self._warned_unsigned:
            self._warned_unsigned = True
            log.warning("SD_WEBHOOK_SECRET is not set: webhook bodies are sent unsigned")
        return headers

    async def _attempt(self, url: str, body: bytes, headers: dict[str, str]) -> _Attempt:
        try:
            target = self.check(url)
            addresses = await self._resolve(target)
            response = await self._post_pinned(target, addresses[0], body, headers)
        except WebhookRefusedError as error:
            return _Attempt(public=f"refused: {error}", detail=f"refused: {error}")
        except (httpx.HTTPError, OSError) as error:
            return _Attempt(retry=True, public=DELIVERY_FAILED, detail=type(error).__name__)
        status = response.status_code
        if 200 <= status < 300:
            return _Attempt(delivered=True, status=status)
        if 300 <= status < 400:
            return _Attempt(public=DELIVERY_FAILED, detail=f"HTTP {status}: redirect refused", status=status)
        return _Attempt(retry=status in RETRY_STATUSES, public=DELIVERY_FAILED, detail=f"HTTP {status}", status=status)

    async def _post_pinned(
        self, target: CallbackTarget, address: IPAddress, body: bytes, headers: dict[str, str]
    ) -> httpx.Response:
        """Connect to the address that was checked, not to whatever DNS answers next."""
        pinned = target.url.copy_with(host=str(address))
        extensions: dict[str, Any] = {}
        if target.scheme == "https":
            extensions["sni_hostname"] = target.host
        request_headers = {**headers, "Host": target.url.netloc.decode("ascii")}
        return await self._client.post(pinned, content=body, headers=request_headers, extensions=extensions)
