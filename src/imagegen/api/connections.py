"""Connection limits of the HTTP server: header, body and keep-alive timeouts and a bound on open
connections, so that slow or idle clients (slowloris) cannot hold the server.

uvicorn closes kept-alive connections after `timeout_keep_alive`, but it has no timeout for a request's
headers or body (a connection that never sends a byte, or sends one a second, stays open for ever),
and its `limit_concurrency` answers 503 to every new request once the limit is reached, which lets a
few hundred slow clients lock everyone out. `imagegen serve` therefore runs uvicorn's own h11
protocol with three additions (`GuardedH11Protocol`):

- header timeout (SD_HEADER_TIMEOUT): a request's headers must be complete within this many seconds
  of the connection opening, or of the first byte of the next request on a kept-alive connection;
  otherwise the server answers 408 and closes. Bytes trickling in do not extend it.
- body timeout (SD_BODY_TIMEOUT): the app answers 408 when a body it reads is not complete in time
  (BodyGuardMiddleware, so `uvicorn imagegen.main:app` has it too); the protocol closes a connection
  still sending a body a little later, which also covers bodies the app never reads (a 401 or 405
  answered before the body).
- a bound on open connections (SD_MAX_CONNECTIONS): when it is reached, a new connection first
  evicts the one that has waited longest for a request (an idle kept-alive connection, or a slow
  one still sending headers); only when every connection is busy with a request is the new one
  refused (503, closed). A flood of slow connections thus costs its senders their own connections,
  never a health probe its answer.
The keep-alive timeout is uvicorn's (SD_KEEPALIVE_TIMEOUT). See docs/operations.md.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from imagegen.config import Settings

log = logging.getLogger("imagegen.connections")

#: Seconds the protocol waits past the body timeout before closing, so that the app's own 408 (with
#: the error envelope) goes out first when the app is reading the body.
BODY_GRACE = 2.0
#: File descriptors kept for what is not a client connection (job database, model files, BFL calls).
_SPARE_FILES = 256
#: Seconds between two log lines about refused connections.
_REFUSAL_LOG_EVERY = 10.0

_TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_FULL_503 = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\nretry-after: 1\r\n\r\n"


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float
    body_timeout: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(settings.header_timeout, settings.body_timeout, settings.max_connections)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body deadlines and a bound on open connections."""

    limits: ClassVar[ConnectionLimits]
    _last_refusal_logged: ClassVar[float] = float("-inf")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard: asyncio.TimerHandle | None = None
        self._guarding: str | None = None  # "header" | "body" while a deadline runs
        #: when this connection started waiting for its next request (eviction picks the oldest)
        self.waiting_since = self.loop.time()

    # -- the protocol's events ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]  # uvicorn narrows it to Transport
        self.waiting_since = self.loop.time()
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            self.transport.write(_FULL_503)
            self.transport.close()
            return
        self._watch("header", self.limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:
            self.waiting_since = self.loop.time()  # idle until the next request (uvicorn's keep-alive)
            self._cancel()
        self._follow_state()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    # -- deadlines ---------------------------------------------------------------------------------
    def _follow_state(self) -> None:
        """Start, keep or stop the deadline that fits where the client is in its request."""
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._guarding == "body":
                self._cancel()  # a body the app did not read has come in whole
            if self._guarding is None and self.conn.trailing_data[0]:
                # The first bytes of the next request on a kept-alive connection: its headers' deadline.
                self._watch("header", self.limits.header_timeout)
        elif state is h11.SEND_BODY:
            if self._guarding != "body":
                self._watch("body", self.limits.body_timeout + BODY_GRACE)
        else:  # the whole request is in (or the connection is ending): the app's time, not the client's
            self._cancel()

    def _watch(self, kind: str, seconds: float) -> None:
        self._cancel()
        self._guarding = kind
        self._guard = self.loop.call_later(seconds, self._expired, kind)

    def _cancel(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
        self._guard = None
        self._guarding = None

    def _expired(self, kind: str) -> None:
        self._guard = None
        self._guarding = None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started or self.cycle.response_complete:
            self.transport.write(_TIMEOUT_408)  # no response under way: a plain 408 can go out
        # Debug only: a flood of slow clients must not become a flood of log lines.
        log.debug(
            "closed a connection from %s: request %s not complete within %g s",
            _client(self.client),
            "headers" if kind == "header" else "body",
            self.limits.header_timeout if kind == "header" else self.limits.body_timeout,
        )
        self.transport.close()

    # -- the bound on open connections ---------------------------------------------------------------
    def waiting_for_request(self) -> bool:
        """No request of this connection is being served: idle, or still sending headers."""
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for a request; False when all are busy."""
        candidates = [
            connection
            for connection in self.connections
            if connection is not self
            and isinstance(connection, GuardedH11Protocol)
            and connection.waiting_for_request()
            and not connection.transport.is_closing()
        ]
        if not candidates:
            now = self.loop.time()
            if now - GuardedH11Protocol._last_refusal_logged >= _REFUSAL_LOG_EVERY:  # one line per period
                GuardedH11Protocol._last_refusal_logged = now
                log.warning(
                    "refusing connections: all %d connections are serving requests (SD_MAX_CONNECTIONS)",
                    len(self.connections) - 1,
                )
            return False
        oldest = min(candidates, key=lambda connection: connection.waiting_since)
        oldest.transport.close()
        return True


def _client(address: tuple[str, int] | None) -> str:
    return f"{address[0]}:{address[1]}" if address else "?"


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn's `http=` (a class per limits: uvicorn instantiates it itself)."""

    class Protocol(GuardedH11Protocol):
        pass

    Protocol.limits = limits
    return Protocol


def fit_file_limit(max_connections: int) -> int:
    """Raise this process's open-file limit so that max_connections fit (up to the hard limit);
    the number of connections that do fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + _SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < wanted:
        fitting = max(16, soft - _SPARE_FILES)
        log.warning(
            "SD_MAX_CONNECTIONS=%d does not fit the open-file limit (%d); at most %d connections",
            max_connections,
            soft,
            fitting,
        )
        return fitting
    return max_connections


def server_config(app: Any, settings: Settings, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration `imagegen serve` runs (and the test launcher, tests/support): the
    guarded protocol, the keep-alive timeout, no access log of uvicorn's (the app logs each request)."""
    limits = ConnectionLimits.from_settings(settings)
    limits = ConnectionLimits(limits.header_timeout, limits.body_timeout, fit_file_limit(limits.max_connections))
    values: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "http": guarded_protocol(limits),
        "timeout_keep_alive": settings.keepalive_timeout,
        "access_log": False,  # the service logs one line per request itself (path only, with request id)
        "timeout_graceful_shutdown": int(settings.shutdown_grace) + 5,
        "proxy_headers": True,
        **options,
    }
    return uvicorn.Config(app, **values)
