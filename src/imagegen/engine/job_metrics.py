"""The engine's on_final hook for the process metrics: one final job becomes one `record_final_job`
call of primitives, so that metrics.py (ground floor) never needs the engine's types."""

from __future__ import annotations

import logging

from imagegen import metrics
from imagegen.engine.jobs import Job, JobStatus

log = logging.getLogger("imagegen.metrics")


def observe_final_job(job: Job) -> None:
    """Count a job that reached its final state. Never raises: counting must not stand between a
    job and its final state."""
    try:
        result = job.result
        generation_s = None
        if job.status is JobStatus.SUCCEEDED and result is not None:
            generation_s = result.timings.generation_ms / 1000
        metrics.record_final_job(
            job.backend,
            job.status.value,
            queue_wait_s=None if job.started_at is None else job.started_at - job.created_at,
            generation_s=generation_s,
            delivered=0 if result is None else len(result.delivered()),
            flagged=0 if result is None else len(result.flagged()),
        )
    except Exception:
        log.exception("metrics: could not record job %s", job.id)
