"""The batching rule, shared by the embedded engine's lanes and the distributed workers: a batch is
the head job plus the queued jobs compatible with it (same `GenerationRequest.batch_key()`), taken in
queue order while their images fit the head's limit. One function, so that both engines merge
exactly the same jobs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from imagegen.backends.base import ImageBackend
from imagegen.config import Settings
from imagegen.engine.jobs import Job


def max_images(settings: Settings, backend: ImageBackend) -> int:
    """The most images one pipeline call of `backend` may make: SD_MAX_BATCH, within its own limit."""
    return max(1, min(settings.max_batch, backend.capabilities().max_batch))


def select_batch(queue: Sequence[Job], max_images: Callable[[Job], int]) -> list[int]:
    """Indices into `queue` (in queue order, head first) of the jobs of the next batch; [] when empty.

    `max_images(head)` is the most images one pipeline call of the head's backend may make."""
    if not queue:
        return []
    head = queue[0]
    budget = max_images(head) - head.request.num_images
    chosen = [0]
    if budget > 0:
        key = head.request.batch_key()
        for index in range(1, len(queue)):
            job = queue[index]
            if budget >= job.request.num_images and job.request.batch_key() == key:
                chosen.append(index)
                budget -= job.request.num_images
    return chosen
