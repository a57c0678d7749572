"""Per-job progress events, fanned out to any number of listeners (SSE streams, waiters)."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

_QUEUE_LIMIT = 2048


@dataclass(frozen=True)
class JobEvent:
    id: int
    event: str  # "queued" | "running" | "progress" | "succeeded" | "failed" | "cancelled"
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.event in ("succeeded", "failed", "cancelled")


class JobEvents:
    """In-process publish/subscribe keyed by job id. Lives on the event loop's thread."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[JobEvent]]] = {}
        self._ids = itertools.count(1)

    def subscribe(self, job_id: str) -> asyncio.Queue[JobEvent]:
        queue: asyncio.Queue[JobEvent] = asyncio.Queue(maxsize=_QUEUE_LIMIT)
        self._subscribers.setdefault(job_id, set()).add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[JobEvent]) -> None:
        listeners = self._subscribers.get(job_id)
        if listeners is None:
            return
        listeners.discard(queue)
        if not listeners:
            del self._subscribers[job_id]

    def publish(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        message = JobEvent(next(self._ids), event, data)
        for queue in list(self._subscribers.get(job_id, ())):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                # A listener that stopped reading loses progress ticks, never the final event.
                if message.final:
                    _ = queue.get_nowait()
                    queue.put_nowait(message)

    def listeners(self, job_id: str) -> int:
        return len(self._subscribers.get(job_id, ()))

    def listened(self) -> list[str]:
        """The job ids someone listens to now."""
        return list(self._subscribers)
