"""Pure ASGI middleware: request ids and access log, API key, body guard.

Order (outermost first): RequestContext -> Head (HEAD routed as GET) -> CORS (only when an allowlist is
set) -> ApiKey -> BodyGuard.
Authentication comes before the body is read, so an unauthenticated caller cannot make the service
read (or parse) anything.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagegen import metrics
from imagegen.api.dialects import error_body, www_authenticate
from imagegen.logging_setup import request_id_var

access_log = logging.getLogger("imagegen.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _headers(scope: Scope, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope.get("headers", ()) if key == name]


async def send_error(
    send: Send,
    status: int,
    error_type: str,
    message: str,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
    path: str | None = None,
) -> None:
    """An error answered before routing, in the dialect of `path` (OpenAI under /v1/, A1111 under /sdapi/)."""
    status, payload = error_body(path, status, error_type, message, None, request_id_var.get())
    body = json.dumps(payload).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def collect_route_templates(*routers: Any) -> list[tuple[re.Pattern[str], str, frozenset[str]]]:
    """(regex, template, methods) of every route of these routers (FastAPI's app.router and ours)."""
    found = []
    for router in routers:
        for route in getattr(router, "routes", ()):
            regex, path = getattr(route, "path_regex", None), getattr(route, "path", None)
            if regex is not None and path:
                found.append((regex, str(path), frozenset(getattr(route, "methods", None) or ())))
    return found


def allowed_methods(scope: Scope) -> list[str]:
    """Every method some route answers on this path (the `Allow` header of a 405): routes of one
    path may be declared apart (GET and DELETE /api/images/{name}). HEAD goes with GET."""
    state = getattr(scope.get("app"), "state", None)
    methods: set[str] = set()
    for regex, _, route_methods in getattr(state, "route_templates", ()):
        if regex.match(scope.get("path", "")):
            methods |= route_methods
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def route_template(scope: Scope) -> str:
    """The route's path template (`/api/jobs/{job_id}`), never the raw path: metric labels stay few.

    A request refused before routing (401, 413) has no route in its scope: it is matched against
    the templates create_app collected (app.state.route_templates), so it still counts under its
    route; a path no route knows is `unmatched`."""
    path = getattr(scope.get("route"), "path", None)
    if path:
        return str(path)
    state = getattr(scope.get("app"), "state", None)
    for regex, template, _ in getattr(state, "route_templates", ()):
        if regex.match(scope.get("path", "")):
            return str(template)
    return "unmatched"


class RequestContextMiddleware:
    """Assigns the request id (X-Request-ID in and out), adds security headers, logs one line per
    request and counts it in the metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status_holder = {"status": 500}
        done = {"value": False}

        def record() -> None:
            if done["value"]:
                return
            done["value"] = True
            elapsed = (time.perf_counter() - started) * 1000
            route = route_template(scope)
            metrics.observe_request(route, scope["method"], status_holder["status"], elapsed / 1000)
            # The path only: query strings never reach the log.
            access_log.info(
                "%s %s %d %.1fms",
                scope["method"],
                scope["path"],
                status_holder["status"],
                elapsed,
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": route,
                    "status_code": status_holder["status"],
                    "duration_ms": round(elapsed, 1),
                },
            )

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                headers = list(message.get("headers", []))
                names = {key.lower() for key, _ in headers}
                headers.append((b"x-request-id", request_id.encode("ascii")))
                headers.extend(item for item in SECURITY_HEADERS if item[0] not in names)
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Counted and logged before the last byte leaves: a client that has its answer (and
                # scrapes /metrics next, or reads the log) always finds this request there.
                record()
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            record()  # no complete response was sent (the app raised, the client went away)
            request_id_var.reset(token)


class HeadMiddleware:
    """HEAD on every GET route (RFC 9110 9.3.2): routed as GET, answered with the GET's status and
    headers and no body. Once the headers are out the app is told the client went away, so a stream
    (the job events) ends at once instead of running for nobody. The access log still says HEAD."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        answered = asyncio.Event()

        async def headers_only(message: Message) -> None:
            if answered.is_set():
                return  # the rest of the body (a stream's next chunks): nobody reads it
            if message["type"] == "http.response.body":
                answered.set()
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        async def until_answered() -> Message:
            if answered.is_set():
                return {"type": "http.disconnect"}
            incoming = asyncio.ensure_future(receive())
            done = asyncio.ensure_future(answered.wait())
            await asyncio.wait({incoming, done}, return_when=asyncio.FIRST_COMPLETED)
            if incoming.done():
                done.cancel()
                return incoming.result()
            incoming.cancel()
            return {"type": "http.disconnect"}

        await self.app({**scope, "method": "GET"}, until_answered, headers_only)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


class ApiKeyMiddleware:
    """Requires SD_API_KEY as `X-API-Key`, `Authorization: Bearer`, or `Authorization: Basic`
    (any user, password = key). Both sides are hashed and compared with compare_digest, so the
    time taken says nothing about the key; failures get no artificial delay."""

    def __init__(self, app: ASGIApp, api_key: str, public_paths: Iterable[str] = ()) -> None:
        self.app = app
        self._key_digest = _digest(api_key)
        self._public = frozenset(public_paths)

    def _candidates(self, scope: Scope) -> list[str]:
        found = _headers(scope, b"x-api-key")
        for value in _headers(scope, b"authorization"):
            # Any run of spaces or tabs separates the scheme from the credentials (RFC 7235 and
            # RFC 9110 allow both).
            scheme, _, credentials = value.strip().replace("\t", " ").partition(" ")
            credentials = credentials.strip()
            if scheme.lower() == "bearer":
                found.append(credentials)
            elif scheme.lower() == "basic":
                try:
                    decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
                except (binascii.Error, UnicodeDecodeError, ValueError):
                    continue
                found.append(decoded.partition(":")[2])
        return found

    def authorized(self, scope: Scope) -> bool:
        ok = False
        for candidate in self._candidates(scope):
            # No early exit: every candidate is compared.
            ok |= hmac.compare_digest(_digest(candidate), self._key_digest)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if scope["path"] in self._public:
            # Open to all; what a public route shows may still depend on the key (/health's details).
            scope.setdefault("state", {})["authenticated"] = self.authorized(scope)
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] == "OPTIONS" and _header(scope, b"origin"):
            await self.app(scope, receive, send)  # CORS preflight carries no credentials
            return
        if self.authorized(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send_error(
            send,
            401,
            "authentication_error",
            "missing or invalid API key: send it as X-API-Key, Authorization: Bearer, or Basic auth",
            [(b"www-authenticate", www_authenticate(scope["path"]))],
            path=scope["path"],
        )


class _BodyTooLarge(StarletteHTTPException):
    """Raised from `receive`: FastAPI re-raises HTTPExceptions from body reading, so the route's
    exception handlers render it in the envelope."""

    def __init__(self, limit: int, setting: str) -> None:
        super().__init__(413, f"request body larger than {limit} bytes ({setting})")


def _origin_host(origin: str) -> str | None:
    parts = urlsplit(origin)
    return parts.netloc.lower() if parts.scheme in ("http", "https") and parts.netloc else None


class _BodyTimeout(StarletteHTTPException):
    """Raised from `receive` when the body is not in within SD_BODY_TIMEOUT; the connection is closed
    after the answer (a client that slow is not kept for another request)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            408, f"the request body did not arrive within {seconds:g} s (SD_BODY_TIMEOUT)", {"Connection": "close"}
        )


class BodyGuardMiddleware:
    """Refuses bodies over the size limit (413, before parsing) and non-JSON bodies on state-changing
    methods (415): a plain HTML form cannot post here, which closes the CSRF door. A body must be in
    within SD_BODY_TIMEOUT seconds of the request's start (408): a client sending a byte a second
    cannot hold a request open (api/connections.py closes the connections of bodies nobody reads).

    The routes that take images (`upload_paths`) have their own limit, SD_MAX_UPLOAD_BYTES; every other
    route keeps SD_MAX_BODY_BYTES. Multipart bodies are accepted on `multipart_paths` only (OpenAI's
    /v1/images/edits, which its SDK posts as a form), and only when the request carries no Origin or
    one of this service (its own host, or SD_CORS_ORIGINS): a cross-site HTML form, which a browser
    would send with its cached Basic credentials, is refused (403). `unread_paths`: routes that never
    read their body (they answer 501 for a feature the service does not have): whatever its type, the
    caller hears that, not that its upload should have been JSON."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        *,
        body_timeout: float = 30.0,
        upload_bytes: int | None = None,
        upload_paths: Iterable[str] = (),
        multipart_paths: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
        unread_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.upload_bytes = upload_bytes if upload_bytes is not None else max_body_bytes
        self.upload_paths = frozenset(upload_paths)
        self.multipart_paths = frozenset(multipart_paths)
        self.allowed_origins = frozenset(filter(None, (_origin_host(origin) for origin in allowed_origins)))
        self.unread_paths = unread_paths

    def _limit(self, path: str) -> tuple[int, str]:
        if path in self.upload_paths:
            return self.upload_bytes, "SD_MAX_UPLOAD_BYTES"
        return self.max_body_bytes, "SD_MAX_BODY_BYTES"

    def _same_site(self, scope: Scope) -> bool:
        """No Origin (SDKs, curl, n8n) or an Origin of this service."""
        origin = _header(scope, b"origin")
        if origin is None:
            return True
        host = _origin_host(origin)
        own = (_header(scope, b"host") or "").lower()
        return host is not None and (host == own or host in self.allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limit, setting = self._limit(path)
        length_header = _header(scope, b"content-length")
        chunked = _header(scope, b"transfer-encoding") is not None
        if length_header is not None:
            try:
                length = int(length_header)
            except ValueError:
                await send_error(send, 400, "invalid_request", "invalid Content-Length", path=path)
                return
            if length > limit:
                await send_error(
                    send, 413, "payload_too_large", f"request body larger than {limit} bytes ({setting})", path=path
                )
                return
        else:
            length = 0
        if (length > 0 or chunked) and scope["path"] not in self.unread_paths:
            content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            multipart = content_type == "multipart/form-data" and path in self.multipart_paths
            if multipart and not self._same_site(scope):
                await send_error(
                    send,
                    403,
                    "permission_denied",
                    "a form posted from another site is refused (Origin is not this service or SD_CORS_ORIGINS)",
                    path=path,
                )
                return
            if not multipart and content_type != "application/json" and not content_type.endswith("+json"):
                accepted = "JSON or multipart/form-data" if path in self.multipart_paths else "JSON"
                await send_error(
                    send,
                    415,
                    "unsupported_media_type",
                    f"the request body must be {accepted}"
                    + ("" if path in self.multipart_paths else " (Content-Type: application/json)"),
                    path=path,
                )
                return

        received = 0
        started = {"value": False}
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()  # after the body: only the disconnect is left to wait for, unbounded
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _BodyTimeout(self.body_timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit, setting)
                body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                started["value"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started["value"]:
                await send_error(
                    send, 413, "payload_too_large", f"request body larger than {limit} bytes ({setting})", path=path
                )
        except _BodyTimeout as error:
            if not started["value"]:
                await send_error(
                    send, 408, "request_timeout", str(error.detail), [(b"connection", b"close")], path=scope["path"]
                )
