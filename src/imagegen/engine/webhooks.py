"""Webhook delivery: POST the final job body to the job's callback_url (n8n's Wait node resume URL).

Outbound URLs come from requests, so they are treated as hostile (SSRF): http(s) only, no
credentials in the URL, cloud-metadata and link-local addresses refused always, hosts outside
SD_WEBHOOK_ALLOWED_HOSTS refused when that is set, the resolved address pinned for the connection
(no DNS-rebinding between check and use), redirects never followed, short timeouts, bounded retries.
The body is signed with HMAC-SHA256 under SD_WEBHOOK_SECRET.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from imagegen.config import Settings
from imagegen.engine.jobs import Job
from imagegen.engine.store import JobStore
from imagegen.errors import InvalidParameterError
from imagegen.retry import backoff_delay

log = logging.getLogger("imagegen.webhooks")

SIGNATURE_HEADER = "X-Imagegen-Signature"
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "metadata.azure.internal", "instance-data"})
# Cloud metadata services that are not link-local addresses.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address) for address in ("fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
#: The longest wait between two attempts (the first is SD_WEBHOOK_BACKOFF, doubling after each).
_MAX_BACKOFF = 60.0


class WebhookRefusedError(Exception):
    pass


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def refused_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address may never receive a webhook, or None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_link_local:
        return "a link-local address (cloud metadata lives there)"
    if address.is_multicast or address.is_unspecified or address.is_reserved:
        return "not a unicast address"
    return None


class WebhookSender:
    def __init__(
        self,
        settings: Settings,
        render: Callable[[Job], dict[str, Any]],
        *,
        resolver: Callable[[str, int], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.render = render
        self._resolver = resolver
        self._allowed = {host.lower() for host in settings.webhook_allowed_hosts}
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            timeout=httpx.Timeout(settings.webhook_timeout),
            trust_env=False,  # never route callbacks through an environment proxy
        )
        self._warned_unsigned = False

    async def close(self) -> None:
        await self._client.aclose()

    # -- validation at submit time (cheap, no DNS) ----------------------------------------------
    def validate(self, url: str) -> None:
        try:
            self._check_static(url)
        except WebhookRefusedError as error:
            raise InvalidParameterError(f"callback_url refused: {error}", param="callback_url") from None

    def _check_static(self, url: str) -> tuple[str, int, str]:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise WebhookRefusedError("not a valid URL") from None
        if parts.scheme not in ("http", "https"):
            raise WebhookRefusedError("only http and https URLs are allowed")
        host = (parts.hostname or "").lower().rstrip(".")
        if not host:
            raise WebhookRefusedError("the URL has no host")
        if parts.username or parts.password:
            raise WebhookRefusedError("credentials in the URL are not allowed")
        if host in METADATA_HOSTS:
            raise WebhookRefusedError("cloud metadata hosts are not allowed")
        if self._allowed and host not in self._allowed:
            raise WebhookRefusedError("the host is not in SD_WEBHOOK_ALLOWED_HOSTS")
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            reason = refused_address(literal)
            if reason:
                raise WebhookRefusedError(f"the host is {reason}")
        return host, port or (443 if parts.scheme == "https" else 80), parts.scheme

    async def _resolve(self, host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        if self._resolver is not None:
            infos = await self._resolver(host, port)
        else:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = []
        for info in infos:
            addresses.append(ipaddress.ip_address(info[4][0].split("%")[0]))
        if not addresses:
            raise WebhookRefusedError("the host does not resolve")
        for address in addresses:
            reason = refused_address(address)
            if reason:
                raise WebhookRefusedError(f"the host resolves to {reason}")
        return addresses

    # -- delivery ------------------------------------------------------------------------------
    async def deliver(self, job: Job, store: JobStore) -> None:
        """POST the job body; retry transient failures with backoff and jitter; record the outcome."""
        url = job.callback_url
        if not url:
            return
        # The body carries the images in base64: built off the event loop.
        rendered = await asyncio.to_thread(self.render, job)
        body = json.dumps(rendered, separators=(",", ":")).encode("utf-8")
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
        state: dict[str, Any] = {"status": "pending", "attempts": 0, "last_error": None, "last_status": None}
        max_attempts = self.settings.webhook_max_attempts
        for attempt in range(1, max_attempts + 1):
            state["attempts"] = attempt
            retry = False
            try:
                host, port, scheme = self._check_static(url)
                addresses = await self._resolve(host, port)
                response = await self._post_pinned(url, host, scheme, addresses[0], body, headers)
                state["last_status"] = response.status_code
                if 200 <= response.status_code < 300:
                    state.update(status="delivered", last_error=None)
                    break
                if 300 <= response.status_code < 400:
                    state["last_error"] = "redirect refused (webhooks never follow redirects)"
                else:
                    state["last_error"] = f"HTTP {response.status_code}"
                    retry = response.status_code in RETRY_STATUSES
            except WebhookRefusedError as error:
                state["last_error"] = f"refused: {error}"
            except httpx.HTTPError as error:
                state["last_error"] = f"{type(error).__name__}"
                retry = True
            except OSError as error:
                state["last_error"] = f"{type(error).__name__}"
                retry = True
            if not retry or attempt == max_attempts:
                state["status"] = "failed"
                break
            await asyncio.sleep(backoff_delay(attempt - 1, self.settings.webhook_backoff, cap=_MAX_BACKOFF))
        state["finished_at"] = time.time()
        job.webhook = state
        store.update(job)
        # A delivery that gave up leaves a caller (an n8n Wait node) waiting: worth an operator's attention.
        log.log(
            logging.INFO if state["status"] == "delivered" else logging.WARNING,
            "job=%s webhook %s attempts=%d%s",
            job.id,
            state["status"],
            state["attempts"],
            f" error={state['last_error']}" if state["last_error"] else "",
        )

    async def _post_pinned(
        self,
        url: str,
        host: str,
        scheme: str,
        address: ipaddress.IPv4Address | ipaddress.IPv6Address,
        body: bytes,
        headers: dict[str, str],
    ) -> httpx.Response:
        """Connect to the address that was checked, not to whatever DNS answers next."""
        original = httpx.URL(url)
        pinned = original.copy_with(host=str(address))
        extensions: dict[str, Any] = {}
        if scheme == "https":
            extensions["sni_hostname"] = host
        request_headers = {**headers, "Host": original.netloc.decode("ascii")}
        return await self._client.post(pinned, content=body, headers=request_headers, extensions=extensions)
