"""Where jobs live. `JobStore` is the interface; `SQLiteJobStore` the embedded default.

Accepted work must survive a restart, so every state change is written before it is acknowledged.
A shared store for several worker machines (PostgreSQL, Redis...) implements the same interface.
"""

from __future__ import annotations

import abc
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from imagegen.engine.jobs import Job, JobStatus
from imagegen.engine.results import JobResult
from imagegen.generation import GenerationRequest

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    status       TEXT NOT NULL,
    backend      TEXT NOT NULL,
    priority     INTEGER NOT NULL DEFAULT 0,
    created_at   REAL NOT NULL,
    started_at   REAL,
    finished_at  REAL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    callback_url TEXT,
    request_id   TEXT,
    request      TEXT NOT NULL,
    result       TEXT,
    error        TEXT,
    webhook      TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
CREATE INDEX IF NOT EXISTS jobs_webhook_pending ON jobs (seq) WHERE json_extract(webhook, '$.status') = 'pending';
"""

_COLUMNS = (
    "id, status, backend, priority, created_at, started_at, finished_at, attempts, callback_url, request_id, "
    "request, result, error, webhook"
)


class JobStore(abc.ABC):
    """Persistence of job records (not of images: those are in the output store)."""

    @abc.abstractmethod
    def add(self, job: Job) -> None: ...

    @abc.abstractmethod
    def update(self, job: Job) -> None: ...

    @abc.abstractmethod
    def get(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    def list_jobs(
        self,
        *,
        status: JobStatus | None = None,
        backend: str | None = None,
        limit: int = 50,
        before: float | None = None,
        prompt: str | None = None,
    ) -> list[Job]:
        """Newest first; `prompt`: only jobs whose prompt contains this text (any case)."""

    @abc.abstractmethod
    def unfinished(self) -> list[Job]:
        """Queued and running jobs, oldest first (what a restart must resume)."""

    @abc.abstractmethod
    def pending_webhooks(self) -> list[Job]:
        """Jobs whose webhook delivery is still pending, oldest first (what a restart must resume)."""

    def close(self) -> None:
        """Release connections."""


#: The database holds prompts, callback URLs and results: readable by the service's user only. SQLite
#: gives its -wal and -shm files the database file's mode.
DB_MODE = 0o600
DB_DIR_MODE = 0o700


def _private_database(path: Path) -> None:
    """Create the folder (0700) and the database file (0600) before SQLite does (it would use the
    umask, typically 0644); tighten the files a previous version left readable to all."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=DB_DIR_MODE)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, DB_MODE))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if file.exists() and file.stat().st_mode & 0o777 != DB_MODE:
                os.chmod(file, DB_MODE)
        except OSError:
            pass  # not ours to change (a shared volume): it stays as the operator set it


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)


def _load(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def _casefold(value: object) -> str | None:
    return value.casefold() if isinstance(value, str) else None


class SQLiteJobStore(JobStore):
    """SQLite in WAL mode: readers never block the writer, and a crash loses nothing committed."""

    def __init__(self, path: Path | str) -> None:
        if str(path) != ":memory:":
            _private_database(Path(path))
        self.path = str(path)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a process crash loses nothing; only power loss may drop the last commits.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        # SQLite's lower() and LIKE fold ASCII only: prompts are matched with Python's casefold.
        self._conn.create_function("casefold", 1, _casefold, deterministic=True)
        self._conn.executescript(SCHEMA)

    def _row(self, job: Job) -> tuple[Any, ...]:
        return (
            job.id,
            job.status.value,
            job.backend,
            job.priority,
            job.created_at,
            job.started_at,
            job.finished_at,
            job.attempts,
            job.callback_url,
            job.request_id,
            job.request.model_dump_json(),
            _dump(None if job.result is None else job.result.to_dict()),
            _dump(job.error),
            _dump(job.webhook),
        )

    @staticmethod
    def _job(row: tuple[Any, ...]) -> Job:
        (
            job_id,
            status,
            _backend,
            priority,
            created,
            started,
            finished,
            attempts,
            callback,
            request_id,
            request,
            result,
            error,
            webhook,
        ) = row
        return Job(
            id=job_id,
            request=GenerationRequest.model_validate_json(request),
            status=JobStatus(status),
            priority=priority,
            created_at=created,
            started_at=started,
            finished_at=finished,
            attempts=attempts,
            callback_url=callback,
            request_id=request_id,
            result=None if result is None else JobResult.from_dict(json.loads(result)),
            error=_load(error),
            webhook=_load(webhook),
        )

    def add(self, job: Job) -> None:
        with self._lock:
            self._conn.execute(f"INSERT INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * 14)})", self._row(job))

    def update(self, job: Job) -> None:
        row = self._row(job)
        with self._lock:
            self._conn.execute(
                "UPDATE jobs SET status=?, backend=?, priority=?, created_at=?, started_at=?, finished_at=?, "
                "attempts=?, callback_url=?, request_id=?, request=?, result=?, error=?, webhook=? WHERE id=?",
                (*row[1:], row[0]),
            )

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else self._job(row)

    def list_jobs(
        self,
        *,
        status: JobStatus | None = None,
        backend: str | None = None,
        limit: int = 50,
        before: float | None = None,
        prompt: str | None = None,
    ) -> list[Job]:
        clauses: list[str] = []
        params: list[object] = []
        if status is not None:
            clauses.append("status=?")
            params.append(status.value)
        if backend is not None:
            clauses.append("backend=?")
            params.append(backend)
        if before is not None:
            clauses.append("created_at<?")
            params.append(before)
        if prompt:
            # The text is a value, never a pattern: % and _ match only themselves.
            escaped = prompt.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            clauses.append("casefold(json_extract(request, '$.prompt')) LIKE ? ESCAPE '\\'")
            params.append(f"%{escaped.casefold()}%")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY created_at DESC, seq DESC LIMIT ?",
                (*params, int(limit)),
            ).fetchall()
        return [self._job(row) for row in rows]

    def unfinished(self) -> list[Job]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE status IN (?, ?) ORDER BY seq",
                (JobStatus.QUEUED.value, JobStatus.RUNNING.value),
            ).fetchall()
        return [self._job(row) for row in rows]

    def pending_webhooks(self) -> list[Job]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE json_extract(webhook, '$.status') = 'pending' ORDER BY seq"
            ).fetchall()
        return [self._job(row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
