"""Job records: every generation, synchronous or not, is a job with an id."""

from __future__ import annotations

import enum
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from imagegen.engine.results import JobResult
from imagegen.generation import GenerationRequest


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Preview:
    """The latest live preview of a running job: a small encoded image of its current latents."""

    step: int
    total: int
    data: bytes
    mime_type: str


@dataclass
class Job:
    id: str
    request: GenerationRequest
    status: JobStatus = JobStatus.QUEUED
    priority: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    callback_url: str | None = None
    request_id: str | None = None
    #: What a succeeded job produced (no pixels: those live in the output store)
    result: JobResult | None = None
    #: {"type", "message", "param", "status_code"} once failed
    error: dict[str, Any] | None = None
    #: webhook delivery state, when a callback_url was given
    webhook: dict[str, Any] | None = None
    #: live progress (kept in memory; not worth a write per denoising step)
    step: int = 0
    total_steps: int = 0
    #: the latest live preview while running (memory only)
    preview: Preview | None = None
    #: (monotonic time, step) of the first step reported in this run: the measured step rate starts there
    step_clock: tuple[float, int] | None = None

    @property
    def backend(self) -> str:
        return self.request.backend

    @property
    def final(self) -> bool:
        return self.status.final

    def record_step(self, step: int, total: int) -> None:
        """A step reported by the backend (the first one of a run starts the step clock)."""
        if self.step_clock is None or step < self.step_clock[1]:
            self.step_clock = (time.monotonic(), step)
        self.step = step
        self.total_steps = total

    def eta_seconds(self) -> float | None:
        """Seconds until the last step, from the step rate measured in this run; None before two steps
        (the first one includes loading and prompt encoding) and once not running."""
        if self.status is not JobStatus.RUNNING or self.step_clock is None:
            return None
        began, first = self.step_clock
        done = self.step - first
        total = self.total_steps or (self.request.steps or 0)
        if done <= 0 or not total:
            return None
        per_step = (time.monotonic() - began) / done
        return round(max(0.0, (total - self.step) * per_step), 1)

    def progress(self) -> dict[str, Any]:
        total = self.total_steps or (self.request.denoising_steps or 0)
        if self.status is JobStatus.SUCCEEDED:
            step = total
        else:
            step = self.step
        fraction = round(step / total, 4) if total else (1.0 if self.status is JobStatus.SUCCEEDED else 0.0)
        return {"step": step, "total": total, "fraction": fraction, "eta_seconds": self.eta_seconds()}


def log_final(logger: logging.Logger, job: Job, status: JobStatus, finished_at: float, error_type: str | None) -> None:
    """The job's final line, with how long it waited and ran (no second line per job), written the
    same way by the embedded engine and a cluster's worker."""
    queued_ms = round(((job.started_at or finished_at) - job.created_at) * 1000, 1)
    run_ms = round((finished_at - job.started_at) * 1000, 1) if job.started_at else None
    logger.info(
        "job=%s %s backend=%s queued=%.1fms run=%sms%s",
        job.id,
        status.value,
        job.backend,
        queued_ms,
        "-" if run_ms is None else f"{run_ms:.1f}",
        f" error={error_type}" if error_type else "",
        extra={
            "job_id": job.id,
            "backend": job.backend,
            "status": status.value,
            "queued_ms": queued_ms,
            "run_ms": run_ms,
            "error_type": error_type,
            "request_id": job.request_id,
        },
    )
