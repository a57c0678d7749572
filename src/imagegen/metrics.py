"""Prometheus metrics: the process-wide events, and the exposition text of /metrics.

Two kinds, kept apart on purpose:

- Events (requests, jobs, images, model loads, BFL errors, deleted outputs) are counters and
  histograms defined once, here, at module level, in prometheus_client's default registry.
  `create_app` runs many times in one process (the tests do it constantly); defining collectors
  there would fail with "Duplicated timeseries", and a per-app registry would have to be handed to
  every backend. Here any module records an event with one import: `metrics.record_bfl_error("credits")`.
  The values are process-wide totals, which is what a scraper of one service process sees.
- State (queue depth, backend states, disk usage, memory) is read from one app's services at
  scrape time by the collector next to the route (api/metrics.py), registered in a registry of that
  app: nothing has to be kept up to date, nothing goes stale, and two apps in one process never mix
  their queues. This module, the ground floor, knows nothing of services.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

log = logging.getLogger("imagegen.metrics")

# `*_created` series double the size of every scrape and no dashboard here uses them.
disable_created_metrics()

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
_LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

HTTP_REQUESTS = Counter(
    "imagegen_http_requests",
    "HTTP requests by route template, method and status code.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "imagegen_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template (event streams last as long as their job).",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
JOBS = Counter("imagegen_jobs", "Jobs that reached a final state, by backend and state.", ["backend", "status"])
QUEUE_WAIT = Histogram(
    "imagegen_job_queue_wait_seconds",
    "Time jobs waited in the queue before they started, by backend.",
    ["backend"],
    buckets=_QUEUE_BUCKETS,
)
GENERATION = Histogram(
    "imagegen_job_generation_seconds",
    "Generation time of succeeded jobs (their pipeline call or BFL task), by backend.",
    ["backend"],
    buckets=_GENERATION_BUCKETS,
)
IMAGES = Counter("imagegen_images_generated", "Images generated and stored, by backend.", ["backend"])
NSFW = Counter(
    "imagegen_images_nsfw_flagged",
    "Images flagged by the safety checker (never returned or stored), by backend.",
    ["backend"],
)
MODEL_LOADS = Counter(
    "imagegen_model_loads", "Pipeline loads by local backend and result (success, failure).", ["backend", "result"]
)
MODEL_LOAD_SECONDS = Histogram(
    "imagegen_model_load_seconds",
    "Time taken by successful pipeline loads (downloads included).",
    ["backend"],
    buckets=_LOAD_BUCKETS,
)
MODEL_UNLOADS = Counter("imagegen_model_unloads", "Pipelines unloaded from memory, by local backend.", ["backend"])
BFL_ERRORS = Counter("imagegen_bfl_errors", "Errors of the BFL cloud API (flux-api backend), by kind.", ["kind"])
OUTPUTS_DELETED = Counter(
    "imagegen_outputs_deleted",
    "Stored images deleted, by reason (age, size: retention; request: the API).",
    ["reason"],
)
OUTPUTS_DELETED_BYTES = Counter(
    "imagegen_outputs_deleted_bytes", "Bytes of stored images deleted, by reason.", ["reason"]
)

#: The kinds `record_bfl_error` accepts; anything else is counted as "other" (a label value never
#: comes from outside text, so the number of series stays bounded).
BFL_ERROR_KINDS = (
    "auth",  # key missing, rejected (401/403)
    "credits",  # out of credits (402)
    "rate_limited",  # 429 after retries, or the account's task limit
    "invalid_request",  # BFL rejected the parameters (400/422)
    "moderated",  # Request Moderated / Content Moderated
    "not_found",  # unknown endpoint or task (404, "Task not found")
    "server_error",  # BFL answered 5xx
    "network",  # BFL could not be reached (connect/read errors)
    "timeout",  # the task did not finish before SD_BFL_TIMEOUT / the job deadline
    "task_failed",  # a task ended with status Error
    "bad_response",  # an answer the backend could not use (no id, not JSON, bad result URL, too large)
    "other",
)
for _kind in BFL_ERROR_KINDS:
    BFL_ERRORS.labels(kind=_kind)  # every kind shows at 0 from the start: rate() and alerts work at once


def record_bfl_error(kind: str) -> None:
    """Count one BFL API error (called by the flux-api backend)."""
    BFL_ERRORS.labels(kind=kind if kind in BFL_ERROR_KINDS else "other").inc()


#: Any token is a valid HTTP method to the server: others are counted as "OTHER", so a client cannot
#: create series at will.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    method = method if method in _METHODS else "OTHER"
    HTTP_REQUESTS.labels(route=route, method=method, status=str(status)).inc()
    HTTP_DURATION.labels(route=route).observe(seconds)


def init_backends(backend_ids: Iterable[str]) -> None:
    """Create every backend's job series at 0, so that dashboards see them before the first job."""
    for backend in backend_ids:
        for status in ("succeeded", "failed", "cancelled"):
            JOBS.labels(backend=backend, status=status)


def record_final_job(
    backend: str,
    status: str,
    *,
    queue_wait_s: float | None,
    generation_s: float | None,
    delivered: int,
    flagged: int,
) -> None:
    """Count one job that reached its final state: its state, how long it waited (None: it never
    started), its generation time (succeeded jobs only), and its images stored and flagged."""
    JOBS.labels(backend=backend, status=status).inc()
    if queue_wait_s is not None:
        QUEUE_WAIT.labels(backend=backend).observe(max(0.0, queue_wait_s))
    if generation_s is not None:
        GENERATION.labels(backend=backend).observe(generation_s)
    if flagged:
        NSFW.labels(backend=backend).inc(flagged)
    if delivered:
        IMAGES.labels(backend=backend).inc(delivered)


#: Events a device process (backends/local/host.py) forwards to the service that owns it, which
#: counts them: loads and unloads happen there, the scrape happens here.
FORWARDED = frozenset({"record_model_load", "record_model_unload"})
_forward: Callable[[str, tuple[Any, ...]], None] | None = None


def forward_events(sink: Callable[[str, tuple[Any, ...]], None] | None) -> None:
    """In a device process: hand the FORWARDED events to `sink(name, args)` instead of counting them."""
    global _forward
    _forward = sink


def record_model_load(backend: str, seconds: float | None, ok: bool) -> None:
    if _forward is not None:
        _forward("record_model_load", (backend, seconds, ok))
        return
    MODEL_LOADS.labels(backend=backend, result="success" if ok else "failure").inc()
    if ok and seconds is not None:
        MODEL_LOAD_SECONDS.labels(backend=backend).observe(seconds)


def record_model_unload(backend: str) -> None:
    if _forward is not None:
        _forward("record_model_unload", (backend,))
        return
    MODEL_UNLOADS.labels(backend=backend).inc()


def record_outputs_deleted(reason: str, count: int, size: int) -> None:
    if count:
        OUTPUTS_DELETED.labels(reason=reason).inc(count)
        OUTPUTS_DELETED_BYTES.labels(reason=reason).inc(size)


def render(registry: CollectorRegistry) -> bytes:
    """The exposition text: process-wide events (and prometheus_client's process/GC/platform
    collectors) followed by this app's state. The two never share a metric name."""
    return generate_latest(REGISTRY) + generate_latest(registry)
