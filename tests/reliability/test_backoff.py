"""Retry waits (BFL calls, webhook deliveries): doubling up to a cap, spread by "equal jitter" so many
callers that failed together do not retry in lockstep, and a server's Retry-After honoured."""

from __future__ import annotations

from imagegen.retry import MAX_RETRY_AFTER, backoff_delay


def test_waits_double_up_to_the_cap_and_stay_in_the_upper_half() -> None:
    for attempt, ceiling in enumerate((1.0, 2.0, 4.0, 8.0, 10.0, 10.0)):
        waits = [backoff_delay(attempt, 1.0, cap=10.0) for _ in range(200)]
        assert all(ceiling / 2 <= wait <= ceiling for wait in waits), (attempt, min(waits), max(waits))
        assert max(waits) - min(waits) > ceiling / 10  # spread out, not one fixed value


def test_retry_after_wins_with_a_little_jitter_and_its_own_cap() -> None:
    waits = [backoff_delay(5, 2.0, cap=10.0, retry_after=3.0) for _ in range(200)]
    assert all(3.0 <= wait <= 4.0 for wait in waits) and len(set(waits)) > 1
    assert all(0.0 <= backoff_delay(0, 0.2, cap=10.0, retry_after=0.0) <= 0.2 for _ in range(50))
    capped = backoff_delay(0, 1.0, cap=10.0, retry_after=10 * MAX_RETRY_AFTER)
    assert MAX_RETRY_AFTER <= capped <= MAX_RETRY_AFTER + 1.0
