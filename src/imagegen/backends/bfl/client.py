"""Speaking the Black Forest Labs API over HTTP: submit, poll, download, credits.

BFL's API as the service uses it is described in docs/flux-api.md. What this module guarantees:
- the key (`x-key`) goes to the configured API host only: a `polling_url` on any other host is refused,
  and result images are downloaded by a second client that never carries the key;
- 429/500/502/503/504 and unreachable hosts are retried a bounded number of times with exponential
  backoff and jitter, honouring `Retry-After`; a submit is retried only when it certainly never
  reached BFL (a connect error), since a repeated submit could start, and bill, a second task;
- every BFL answer becomes one of our typed errors with a message that says what to do, never the key;
- every transport failure is one of them too: BFL not reached at all (connect errors, after the
  retries) is 503 `backend_unavailable`; an answer that broke on the way (a redirect loop, a protocol
  or TLS error, a body that does not decode, a read that timed out) is 502 `upstream_error`.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit

import httpx
from pydantic import SecretStr

from imagegen.errors import (
    BackendUnavailableError,
    ContentModeratedError,
    DeadlineExceededError,
    InvalidParameterError,
    PaymentRequiredError,
    ServiceError,
    UpstreamError,
)
from imagegen.retry import backoff_delay

log = logging.getLogger("imagegen.backends.bfl.backend")

#: Answers worth retrying: BFL's documented 429/500/503, plus the 502/504 a gateway in front may give.
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Poll statuses after which the task no longer runs at BFL (anything else means "keep polling").
FINAL_STATUSES = frozenset({"Ready", "Request Moderated", "Content Moderated", "Error", "Task not found"})
KEY_REJECTED = "BFL key rejected: check SD_BFL_API_KEY"
OUT_OF_CREDITS = "BFL account out of credits"


def tagged(error: ServiceError, kind: str) -> ServiceError:
    """Mark an error with its kind for the `imagegen_bfl_errors_total` metric (see metrics.py)."""
    error.cause_kind = kind
    return error


# api.bfl.ai, api.eu.bfl.ai, api.us1.bfl.ai, ... (the hosts BFL's own polling URLs use).
_BFL_API_HOST = re.compile(r"api[a-z0-9-]*(?:\.[a-z0-9-]+)*\.bfl\.ai")
_MAX_TEXT = 300
_MAX_BACKOFF = 30.0


@dataclass(frozen=True)
class Submission:
    task_id: str
    polling_url: str
    cost: float | None
    submitted_at: float  # time.monotonic()


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _origin(url: str) -> tuple[str, str, int] | None:
    parts = urlsplit(url)
    if not parts.hostname or parts.username or parts.password:
        return None
    try:
        port = parts.port or _default_port(parts.scheme)
    except ValueError:
        return None
    return parts.scheme, parts.hostname.lower(), port


def is_bfl_api_url(url: str, api_url: str) -> bool:
    """True when `url` may receive the key: the configured API origin, or https on an api*.bfl.ai host."""
    origin = _origin(url)
    if origin is None:
        return False
    if origin == _origin(api_url):
        return True
    scheme, host, port = origin
    return scheme == "https" and port == 443 and _BFL_API_HOST.fullmatch(host) is not None


def _tls_failure(error: BaseException) -> bool:
    """True when a TLS error lies under this httpx error (httpx reports a failed handshake as a
    ConnectError): the host was reached but its certificate or protocol is wrong, which a retry in a
    second does not fix."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _not_reached(error: httpx.HTTPError) -> bool:
    """True when the request certainly never reached BFL (nothing was sent): safe to retry anything."""
    connect = isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
    return connect and not _tls_failure(error)


def _retryable(error: httpx.HTTPError) -> bool:
    """Failures a second try may not meet: not reached, a dropped connection, a timed-out read.
    A redirect loop, a body that does not decode, an unsupported scheme or a TLS error are answers
    that will be the same next time."""
    if isinstance(error, (httpx.TooManyRedirects, httpx.DecodingError, httpx.UnsupportedProtocol)):
        return False
    return isinstance(error, httpx.TransportError) and not _tls_failure(error)


def describe_failure(error: httpx.HTTPError) -> str:
    """A short name for a transport failure (never the URL, which may carry a signature)."""
    if isinstance(error, httpx.TooManyRedirects):
        return "too many redirects"
    if _tls_failure(error):
        return "TLS error"
    return type(error).__name__


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def parse_progress(value: Any) -> float | None:
    """BFL's `progress` as a fraction 0..1 (a value above 1 is read as a percentage)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    fraction = float(value) / 100.0 if value > 1 else float(value)
    return min(1.0, max(0.0, fraction))


class BflClient:
    """One per backend: two connection pools (API with the key, downloads without)."""

    def __init__(
        self,
        *,
        api_url: str,
        api_key: SecretStr,
        request_timeout: float,
        max_retries: int,
        retry_backoff: float,
        on_key_status: Callable[[str], None] | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._key = api_key
        self._request_timeout = request_timeout
        self._max_retries = max_retries
        self._retry_backoff = retry_backoff
        self._on_key_status = on_key_status
        self._api: httpx.AsyncClient | None = None
        self._downloads: httpx.AsyncClient | None = None

    @property
    def api_host(self) -> str:
        return urlsplit(self.api_url).netloc

    # -- clients, made on first use so they belong to the running event loop ----------------------
    def _api_client(self) -> httpx.AsyncClient:
        if self._api is None:
            # Redirects are not followed: the key must not follow a redirect to another host.
            self._api = httpx.AsyncClient(
                follow_redirects=False,
                timeout=httpx.Timeout(self._request_timeout),
                # An idle connection is dropped here before a server's usual idle timeout (uvicorn's is
                # 5 s) can close it under a submit: a submit that dies on a reused connection is not
                # retried (the task may exist), so that race would be a 502.
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=32, keepalive_expiry=4.0),
                headers={"accept": "application/json"},
            )
        return self._api

    def _download_client(self) -> httpx.AsyncClient:
        if self._downloads is None:
            # A separate client with no default headers at all: it cannot leak the key. Signed result
            # URLs may redirect to a CDN, so a few redirects are followed.
            self._downloads = httpx.AsyncClient(
                follow_redirects=True, max_redirects=3, timeout=httpx.Timeout(self._request_timeout)
            )
        return self._downloads

    async def aclose(self) -> None:
        for client in (self._api, self._downloads):
            if client is not None:
                await client.aclose()
        self._api = self._downloads = None

    # -- the API ---------------------------------------------------------------------------------
    async def submit(self, model: str, payload: dict[str, Any], *, deadline: float) -> Submission:
        """POST /v1/<model>; returns the task id and its polling URL (checked to be a BFL API host)."""
        response = await self._send(
            "POST", f"{self.api_url}/v1/{model}", deadline=deadline, json=payload, idempotent=False, what="submit"
        )
        # When the task started at BFL, as near as this side can tell: when the (last) submit was sent,
        # not when its answer came back. Polls aimed at the estimated finish then land just after it, not
        # just before it (an early poll costs a whole backoff pause; under load the answer is late).
        sent_at = time.monotonic() - response.elapsed.total_seconds()
        if response.status_code != 200:
            self._raise_for_status(response, "submit", model=model)
        self._report_key("ok")
        body = self._json(response, "submit")
        task_id = body.get("id")
        if not isinstance(task_id, str) or not task_id:
            raise UpstreamError("BFL accepted the request but returned no task id")
        # Older BFL answers carried no polling_url: the task is then polled on the configured host.
        polling_url = body.get("polling_url") or f"{self.api_url}/v1/get_result?id={task_id}"
        if not isinstance(polling_url, str) or not is_bfl_api_url(polling_url, self.api_url):
            origin = _origin(polling_url) if isinstance(polling_url, str) else None
            host = origin[1] if origin else "?"
            raise UpstreamError(
                f"BFL returned a polling_url on a host that is not a BFL API host ({_short(host)}); "
                "refused to send the key there"
            )
        cost = body.get("cost")
        log.debug("bfl task=%s submitted model=%s", task_id, model)
        return Submission(
            task_id=task_id,
            polling_url=polling_url,
            cost=float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) else None,
            submitted_at=sent_at,
        )

    async def poll(self, submission: Submission, *, deadline: float) -> dict[str, Any]:
        """One GET of the polling URL: the task's status body."""
        response = await self._send("GET", submission.polling_url, deadline=deadline, idempotent=True, what="poll")
        if response.status_code == 404:
            return {"id": submission.task_id, "status": "Task not found"}
        if response.status_code != 200:
            self._raise_for_status(response, "poll")
        body = self._json(response, "poll")
        if not isinstance(body.get("status"), str):
            raise UpstreamError("BFL answered a poll without a status")
        return body

    async def key_status(self, *, timeout: float) -> tuple[str, float | None, str]:
        """One GET /v1/credits (no retries: a background health check) as (state, credits, detail);
        state is ok | no_credits | rejected | unsupported (no such route) | unreachable."""
        try:
            response = await self._send(
                "GET",
                f"{self.api_url}/v1/credits",
                deadline=time.monotonic() + timeout,
                idempotent=True,
                what="credits",
                retries=0,
            )
        except ServiceError as error:
            return "unreachable", None, error.message
        status = response.status_code
        if status in (401, 403):
            return "rejected", None, ""
        if status == 402:
            return "no_credits", None, ""
        if status == 404:
            return "unsupported", None, ""  # the reference calls /v1/credits optional
        if status != 200:
            return "unreachable", None, f"HTTP {status}"
        try:
            value = response.json().get("credits")
        except (ValueError, AttributeError):
            return "unreachable", None, "the credits answer is not JSON"
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return "ok", None, ""
        return ("ok" if value > 0 else "no_credits"), float(value), ""

    async def download(self, url: str, *, deadline: float, max_bytes: int) -> bytes:
        """GET a result URL without the key, refusing bodies larger than max_bytes."""
        parts = urlsplit(url)
        allowed = ("https", "http") if urlsplit(self.api_url).scheme == "http" else ("https",)
        if parts.scheme not in allowed or not parts.hostname:
            raise UpstreamError("BFL returned a result URL that is not an https URL")
        response = await self._send("GET", url, deadline=deadline, idempotent=True, what="download", stream=True)
        try:
            if response.status_code in (401, 403, 404, 410):
                raise UpstreamError(
                    f"the BFL result URL has expired or is not valid (HTTP {response.status_code}); result URLs "
                    "last about 10 minutes"
                )
            if response.status_code != 200:
                raise UpstreamError(f"downloading the BFL result failed: HTTP {response.status_code}")
            too_large = UpstreamError(
                f"the BFL result is larger than {max_bytes} bytes (SD_BFL_MAX_DOWNLOAD_BYTES); not downloaded"
            )
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise too_large
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > max_bytes:
                    raise too_large
            return bytes(data)
        except httpx.HTTPError as error:  # a connection dropped mid-body, a body that does not decode
            raise tagged(
                UpstreamError(f"downloading the BFL result failed: {describe_failure(error)}"), "network"
            ) from None
        finally:
            await response.aclose()

    # -- HTTP with retries -----------------------------------------------------------------------
    async def _send(
        self,
        method: str,
        url: str,
        *,
        deadline: float,
        idempotent: bool,
        what: str,
        json: dict[str, Any] | None = None,
        stream: bool = False,
        retries: int | None = None,
    ) -> httpx.Response:
        """Send, retrying transient failures; return the first non-transient response."""
        download = what == "download"
        client = self._download_client() if download else self._api_client()
        headers = None if download else {"x-key": self._key.get_secret_value()}
        retries = self._max_retries if retries is None else retries
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError(f"the BFL {what} did not complete before the deadline")
            try:
                request = client.build_request(
                    method, url, headers=headers, json=json, timeout=min(self._request_timeout, remaining)
                )
            except httpx.InvalidURL:
                raise tagged(UpstreamError(f"BFL gave a {what} URL that is not a valid URL"), "bad_response") from None
            retry_after: float | None = None
            try:
                response = await client.send(request, stream=stream)
            except httpx.HTTPError as error:
                problem = describe_failure(error)
                if not _retryable(error):
                    raise tagged(UpstreamError(f"BFL's {what} failed: {problem}"), "bad_response") from None
                # A connect failure means nothing reached BFL; anything later may have created a task.
                if not (idempotent or _not_reached(error)):
                    raise tagged(
                        UpstreamError(
                            f"BFL did not answer the {what} ({problem}); it is not retried because the task may "
                            "already exist"
                        ),
                        "network",
                    ) from None
                status = None
                reached = not _not_reached(error)
            else:
                if response.status_code not in TRANSIENT_STATUSES:
                    return response
                status = response.status_code
                retry_after = retry_after_seconds(response.headers.get("retry-after"))
                problem = f"HTTP {status}"
                reached = True
                await response.aclose()
            if attempt >= retries:
                raise self._exhausted(what, status, problem, attempt + 1, reached=reached)
            delay = backoff_delay(attempt, self._retry_backoff, cap=_MAX_BACKOFF, retry_after=retry_after)
            if delay >= deadline - time.monotonic():
                raise tagged(
                    BackendUnavailableError(
                        f"BFL {what} failed ({problem}) and its retry delay of {delay:.1f} s runs past the deadline"
                    ),
                    "timeout",
                )
            attempt += 1
            log.warning("BFL %s answered %s; retry %d/%d in %.2f s", what, problem, attempt, retries, delay)
            await asyncio.sleep(delay)

    @staticmethod
    def _exhausted(what: str, status: int | None, problem: str, attempts: int, *, reached: bool) -> ServiceError:
        if status is None and reached:
            # BFL was reached but the answer broke on the way every time (a dropped connection, a
            # protocol error, a read that timed out): an upstream failure, not an unavailable backend.
            return tagged(
                UpstreamError(f"BFL's {what} failed ({problem}) after {attempts} attempt(s); retry later"), "network"
            )
        if status == 429:
            reason, kind = "BFL is busy (HTTP 429: too many active tasks)", "rate_limited"
        elif status is None:
            reason, kind = f"cannot reach BFL ({problem})", "network"
        else:
            reason, kind = f"BFL is unavailable ({problem})", "server_error"
        return tagged(
            BackendUnavailableError(f"{reason}; the {what} failed after {attempts} attempt(s); retry later"), kind
        )

    # -- mapping BFL's answers -------------------------------------------------------------------
    def _report_key(self, status: str) -> None:
        if self._on_key_status is not None:
            self._on_key_status(status)

    def _raise_for_status(self, response: httpx.Response, what: str, *, model: str | None = None) -> NoReturn:
        status = response.status_code
        if status in (401, 403):
            self._report_key("rejected")
            raise tagged(BackendUnavailableError(KEY_REJECTED), "auth")
        if status == 402:
            self._report_key("no_credits")
            raise PaymentRequiredError(OUT_OF_CREDITS)
        detail = self._detail(response)
        if what == "submit" and status in (400, 422):
            raise InvalidParameterError(f"BFL rejected the request: {detail or f'HTTP {status}'}")
        if what == "submit" and status == 404:
            raise tagged(UpstreamError(f"BFL has no endpoint /v1/{model} at {self.api_host} (HTTP 404)"), "not_found")
        kind = "server_error" if status >= 500 else "not_found" if status == 404 else "bad_response"
        raise tagged(UpstreamError(f"BFL {what} failed: HTTP {status}" + (f": {detail}" if detail else "")), kind)

    def _json(self, response: httpx.Response, what: str) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            raise UpstreamError(f"BFL answered the {what} with a body that is not JSON") from None
        if not isinstance(body, dict):
            raise UpstreamError(f"BFL answered the {what} with an unexpected body")
        return body

    def _detail(self, response: httpx.Response) -> str:
        """BFL's `detail` (a string or a FastAPI-style list) as one line; input values are never echoed."""
        try:
            body = response.json()
        except ValueError:
            return ""
        detail = body.get("detail") if isinstance(body, dict) else None
        if isinstance(detail, str):
            return self.scrub(detail)
        if isinstance(detail, list):
            parts = []
            for item in detail[:5]:
                if not isinstance(item, dict):
                    continue
                loc = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
                message = str(item.get("msg", "invalid"))
                parts.append(f"{loc}: {message}" if loc else message)
            return self.scrub("; ".join(parts))
        return ""

    def scrub(self, text: str) -> str:
        """Shorten upstream text and make sure the key cannot ride along in it."""
        text = _short(text)
        key = self._key.get_secret_value()
        return text.replace(key, "[redacted]") if key else text


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."


def _reasons(details: Any) -> str:
    """BFL's `details` (e.g. {"Moderation Reasons": ["..."]}) as one short line."""
    if isinstance(details, str):
        return _short(details)
    if isinstance(details, dict):
        parts = []
        for key, value in details.items():
            if isinstance(value, (list, tuple)):
                value = ", ".join(str(item) for item in value)
            if isinstance(value, (str, int, float)):
                parts.append(f"{key}: {value}")
        return _short("; ".join(parts))
    return ""


def raise_for_final_status(body: dict[str, Any], task_id: str, scrub: Callable[[str], str]) -> dict[str, Any]:
    """The `result` of a Ready task; every other final status becomes its error."""
    status = body.get("status")
    reasons = scrub(_reasons(body.get("details")))
    suffix = f" ({reasons})" if reasons else ""
    if status == "Ready":
        result = body.get("result")
        if not isinstance(result, dict) or not isinstance(result.get("sample"), str):
            raise UpstreamError(f"BFL reported task {task_id} ready without a result URL")
        return result
    if status == "Request Moderated":
        raise ContentModeratedError(
            f"BFL's moderation flagged the request (stage: input); nothing was generated or charged{suffix}",
            param="prompt",
        )
    if status == "Content Moderated":
        raise ContentModeratedError(
            f"BFL's moderation flagged the generated image (stage: output); it is not returned{suffix}"
        )
    if status == "Task not found":
        raise tagged(
            UpstreamError(f"BFL does not know task {task_id} (Task not found): it expired or was never created"),
            "not_found",
        )
    raise tagged(UpstreamError(f"BFL failed the task (status {status}){suffix or ': no reason given'}"), "task_failed")
