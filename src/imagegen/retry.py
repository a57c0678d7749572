"""How long to wait before retrying a transient failure: exponential backoff with "equal jitter".

The wait doubles with each attempt up to a cap, and is drawn between half that ceiling and the
ceiling: many callers that failed together spread out instead of retrying in lockstep, and no wait
is ever near zero. Used by the BFL client and by webhook delivery.
"""

from __future__ import annotations

import random

#: The longest a server's Retry-After is honoured (a larger value is treated as this).
MAX_RETRY_AFTER = 120.0


def backoff_delay(
    attempt: int,
    first: float,
    *,
    cap: float,
    retry_after: float | None = None,
    retry_after_cap: float = MAX_RETRY_AFTER,
) -> float:
    """Seconds to wait before retry number `attempt + 1` (`attempt` counts from 0).

    first: the ceiling of the first wait; it doubles per attempt up to `cap`. retry_after: when the
    server said how long to wait (Retry-After), that (up to `retry_after_cap`) plus up to
    min(1 s, first) of jitter, so that tasks told the same time do not all return at once."""
    if retry_after is not None:
        return min(retry_after, retry_after_cap) + random.uniform(0, min(1.0, first))
    ceiling = min(cap, first * (2**attempt))
    return random.uniform(ceiling / 2, ceiling)
