"""The Redis client of a node, and what its errors mean to a caller.

Short timeouts and one quick retry (which reconnects a pooled connection that a Redis restart left
dead): while Redis is unreachable a request gets 503 + Retry-After within a few seconds, never a
hang. The URL may carry a password, so it is never logged: `describe()` names the host or socket only.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from imagegen.config import Settings
from imagegen.errors import QueueUnavailableError

log = logging.getLogger("imagegen.cluster")

#: Seconds to connect, and to wait for any answer (scripts take microseconds; pub/sub reads pass their own).
CONNECT_TIMEOUT = 2.0
SOCKET_TIMEOUT = 3.0
#: What a client is told to wait before trying again while Redis is unreachable.
RETRY_AFTER = 2

#: Errors that mean "Redis cannot be used right now" (down, restarting, loading its AOF, out of disk).
UNREACHABLE: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError)


def connect(settings: Settings, name: str) -> Redis:
    """A client (a pool of connections) for SD_REDIS_URL, answering str."""
    assert settings.redis_url is not None, "distributed mode needs SD_REDIS_URL"
    return Redis.from_url(
        settings.redis_url.get_secret_value(),
        decode_responses=True,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), 1),
        health_check_interval=10,
        client_name=name,
    )


def describe(settings: Settings) -> str:
    """Where Redis is, without credentials: host:port/db or the socket path."""
    if settings.redis_url is None:
        return "(no Redis)"
    parts = urlsplit(settings.redis_url.get_secret_value())
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    try:
        port = parts.port or 6379
    except ValueError:
        port = 6379
    return f"{parts.scheme}://{parts.hostname}:{port}{parts.path or ''}"


def is_unreachable(error: BaseException) -> bool:
    if isinstance(error, UNREACHABLE):
        return True
    # A Redis that cannot write its AOF/RDB refuses writes; a replica in the middle of a failover too.
    return isinstance(error, ResponseError) and str(error).startswith(("MISCONF", "READONLY", "MASTERDOWN"))


def unavailable(error: BaseException) -> QueueUnavailableError:
    """The 503 a caller gets while Redis cannot be used."""
    kind = "timed out" if isinstance(error, RedisTimeoutError) else type(error).__name__
    if isinstance(error, BusyLoadingError):
        kind = "loading its data"
    elif isinstance(error, ResponseError):
        kind = str(error).split(" ", 1)[0]
    return QueueUnavailableError(
        f"the job queue (Redis) is unreachable ({kind}); retry in a few seconds", retry_after=RETRY_AFTER
    )


__all__ = ["RETRY_AFTER", "UNREACHABLE", "RedisError", "connect", "describe", "is_unreachable", "unavailable"]
