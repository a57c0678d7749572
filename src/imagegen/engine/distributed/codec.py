"""A job and its Redis hash (`{prefix}:job:<id>`): flat string fields, None as "".

The request, result, error and webhook state are JSON in the same shapes the SQLite store keeps
(engine/store.py), so a job reads the same from either engine.
"""

from __future__ import annotations

import json
from typing import Any

from imagegen.engine.jobs import Job, JobStatus
from imagegen.engine.results import JobResult
from imagegen.generation import GenerationRequest


def _float(value: str | None) -> float | None:
    return float(value) if value else None


def _json(value: Any) -> str:
    return "" if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)


def _load(value: str | None) -> Any:
    return json.loads(value) if value else None


def new_job_fields(job: Job, *, route: str, replica: str) -> dict[str, str]:
    """The fields written at admission (the admit script adds `rank` and `seq`)."""
    return {
        "id": job.id,
        "status": job.status.value,
        "backend": job.backend,
        "model": job.request.model,
        "route": route,
        "priority": str(job.priority),
        "created_at": repr(job.created_at),
        "started_at": "",
        "finished_at": "",
        "attempts": str(job.attempts),
        "callback_url": job.callback_url or "",
        "request_id": job.request_id or "",
        "request": job.request.model_dump_json(),
        "result": "",
        "error": "",
        "webhook": "",
        "step": "0",
        "total": "0",
        "worker": "",
        "run": "",
        "replica": replica,
    }


def text_fields(raw: Any) -> dict[str, str]:
    """A hash as the client returns it (str with decode_responses), typed."""
    return {str(key): str(value) for key, value in dict(raw).items()}


def job_from_fields(raw: Any) -> Job:
    fields = text_fields(raw)
    result = _load(fields.get("result"))
    return Job(
        id=fields["id"],
        request=GenerationRequest.model_validate_json(fields["request"]),
        status=JobStatus(fields["status"]),
        priority=int(fields.get("priority") or 0),
        created_at=float(fields["created_at"]),
        started_at=_float(fields.get("started_at")),
        finished_at=_float(fields.get("finished_at")),
        attempts=int(fields.get("attempts") or 0),
        callback_url=fields.get("callback_url") or None,
        request_id=fields.get("request_id") or None,
        result=None if result is None else JobResult.from_dict(result),
        error=_load(fields.get("error")),
        webhook=_load(fields.get("webhook")),
        step=int(fields.get("step") or 0),
        total_steps=int(fields.get("total") or 0),
    )


def webhook_field(state: dict[str, Any] | None) -> str:
    return _json(state)
