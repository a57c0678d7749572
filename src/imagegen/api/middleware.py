"""Pure ASGI middleware: request ids and access log, API key, body guard.

Order (outermost first): RequestContext -> CORS (only when an allowlist is set) -> ApiKey -> BodyGuard.
Authentication comes before the body is read, so an unauthenticated caller cannot make the service
read (or parse) anything.
"""

from __future__ import annotations

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
            decoded: str = value.decode("latin-1")
            return decoded
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
    path may be declared apart (GET and DELETE /api/images/{name})."""
    state = getattr(scope.get("app"), "state", None)
    methods: set[str] = set()
    for regex, _, route_methods in getattr(state, "route_templates", ()):
        if regex.match(scope.get("path", "")):
            methods |= route_methods
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
            scheme, _, credentials = value.strip().partition(" ")
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
        if scope["type"] not in ("http", "websocket") or scope["path"] in self._public:
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

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes (SD_MAX_BODY_BYTES)")


class BodyGuardMiddleware:
    """Refuses bodies over SD_MAX_BODY_BYTES (413, before parsing) and non-JSON bodies on state-changing
    methods (415): a plain HTML form cannot post here, which closes the CSRF door.

    `unread_paths`: routes that never read their body (they answer 501 for a feature the service does
    not have): whatever its type, the caller hears that, not that its upload should have been JSON."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, unread_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.unread_paths = unread_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length_header = _header(scope, b"content-length")
        chunked = _header(scope, b"transfer-encoding") is not None
        if length_header is not None:
            try:
                length = int(length_header)
            except ValueError:
                await send_error(send, 400, "invalid_request", "invalid Content-Length", path=scope["path"])
                return
            if length > self.max_body_bytes:
                await send_error(
                    send,
                    413,
                    "payload_too_large",
                    f"request body larger than {self.max_body_bytes} bytes (SD_MAX_BODY_BYTES)",
                    path=scope["path"],
                )
                return
        else:
            length = 0
        if (length > 0 or chunked) and scope["path"] not in self.unread_paths:
            content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            if content_type != "application/json" and not content_type.endswith("+json"):
                await send_error(
                    send,
                    415,
                    "unsupported_media_type",
                    "the request body must be JSON (Content-Type: application/json)",
                    path=scope["path"],
                )
                return

        received = 0
        started = {"value": False}

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge(self.max_body_bytes)
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
                    send,
                    413,
                    "payload_too_large",
                    f"request body larger than {self.max_body_bytes} bytes (SD_MAX_BODY_BYTES)",
                    path=scope["path"],
                )
