"""The flux-api key check behind /health: cached, refreshed in the background, never on the caller's time.

`health()` is synchronous and called often (probes, every job admission), from the event loop and from
worker threads; it only reads the cached state here. When that state is older than
SD_BFL_KEY_CHECK_INTERVAL a refresh (one GET /v1/credits) is started on the event loop, so BFL sees at
most one check per interval however often /health is polled. Real calls are fresher evidence than the
last check, so 401/403, 402 and successful submits update the state too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from imagegen.backends.bfl.client import BflClient

log = logging.getLogger("imagegen.backends.bfl.backend")


@dataclass(frozen=True)
class KeyCheck:
    """The last known state of the key."""

    state: str = "unchecked"  # unchecked | ok | rejected | no_credits | unreachable | unsupported | disabled
    credits: float | None = None
    checked_at: float | None = None  # time.monotonic()
    detail: str = ""


class KeyMonitor:
    def __init__(self, client: BflClient, *, enabled: bool, interval: float, timeout: float) -> None:
        self._client = client
        self._enabled = enabled
        self._interval = interval
        self._timeout = timeout
        self._state = KeyCheck(state="unchecked" if enabled else "disabled")
        self._lock = threading.Lock()
        self._refreshing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Checks run on this loop (the app's), from now on."""
        self._loop = loop
        self._refresh_if_stale()

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def current(self) -> KeyCheck:
        """The cached state, at once; starts a background refresh when it is stale (any thread)."""
        self._refresh_if_stale()
        with self._lock:
            return self._state

    def learn(self, status: str) -> None:
        """A real call's verdict on the key: ok | rejected | no_credits."""
        with self._lock:
            if status == "ok" and self._state.state in ("ok", "disabled", "unsupported"):
                return  # nothing new; keep the credits figure of the last check
            state = "disabled" if status == "ok" and not self._enabled else status
            self._state = KeyCheck(state=state, checked_at=time.monotonic())

    def _refresh_if_stale(self) -> None:
        if not self._enabled or self._loop is None:
            return
        with self._lock:
            checked = self._state.checked_at
            if self._refreshing or (checked is not None and time.monotonic() - checked < self._interval):
                return
            self._refreshing = True
        try:
            self._loop.call_soon_threadsafe(self._start_check)
        except RuntimeError:  # the loop is closed: the app is shutting down
            with self._lock:
                self._refreshing = False

    def _start_check(self) -> None:
        task = asyncio.get_running_loop().create_task(self._check())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check(self) -> None:
        try:
            state, credits, detail = await self._client.key_status(timeout=self._timeout)
        except Exception as error:  # noqa: BLE001 - a health probe must never take the service down
            state, credits, detail = "unreachable", None, type(error).__name__
        with self._lock:
            self._state = KeyCheck(state=state, credits=credits, checked_at=time.monotonic(), detail=detail)
            self._refreshing = False
        log.info("BFL key check: %s%s", state, f" ({detail})" if detail else "")
