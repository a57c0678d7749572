"""GET /metrics: Prometheus exposition (behind the API key unless SD_METRICS_PUBLIC=true).

The process-wide event counters live in imagegen/metrics.py; the state of this app (queue, backends,
disk, memory; in a cluster also the fleet) is read from its services at scrape time by
`ServiceCollector`, in a registry made for that scrape (`app_registry`), so nothing goes stale and two
apps in one process never mix their queues. The engine's counts are read first, asynchronously (in a
cluster they come from Redis), and handed to the collector.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import psutil
from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imagegen import __version__, metrics
from imagegen.backends.base import BackendState
from imagegen.errors import ServiceError
from imagegen.services import Services

log = logging.getLogger("imagegen.metrics")

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus metrics: requests, jobs, queue, timings, images, model loads, BFL errors, disk, memory
    (in a cluster also queue depth per backend/model, live workers, reclaimed jobs, lease expiries)."""
    services: Services = request.app.state.services
    try:
        stats: dict[str, Any] | None = await services.engine.stats()
    except ServiceError:  # the shared store is unreachable: the rest still renders, imagegen_redis_up says 0
        stats = None
    body = await asyncio.to_thread(metrics.render, app_registry(services, stats))
    return Response(body, media_type=metrics.CONTENT_TYPE)


class ServiceCollector(Collector):
    """Gauges read from one app's services (and the engine's counts read just before) at a scrape."""

    def __init__(self, services: Services, stats: dict[str, Any] | None) -> None:
        self.services = services
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        for part in (self._engine, self._fleet, self._backends, self._disk, self._memory, self._info):
            try:
                yield from part()
            except Exception:
                log.warning("metrics: %s failed", part.__name__, exc_info=True)

    def _engine(self) -> Iterator[Metric]:
        stats = self.stats
        if stats is None:
            return
        depth = GaugeMetricFamily("imagegen_queue_depth", "Jobs waiting in the queue, by lane.", labels=["lane"])
        busy = GaugeMetricFamily("imagegen_jobs_running", "Batches running now, by lane.", labels=["lane"])
        for lane, values in stats["lanes"].items():
            depth.add_metric([lane], values["queued"])
            busy.add_metric([lane], values["busy"])
        yield depth
        yield busy
        yield GaugeMetricFamily(
            "imagegen_queue_limit", "Jobs allowed to wait (SD_MAX_QUEUE).", value=stats["max_queue"]
        )
        yield GaugeMetricFamily(
            "imagegen_draining", "1 while the service refuses new jobs (shutting down).", value=int(stats["draining"])
        )

    def _fleet(self) -> Iterator[Metric]:
        """A cluster's own figures (docs/scale-out.md); absent in one process."""
        fleet = None if self.stats is None else self.stats.get("fleet")
        if self.services.engine.health_details().get("mode") != "distributed":
            return
        yield GaugeMetricFamily(
            "imagegen_redis_up", "1 while Redis answers (distributed mode).", value=int(self.stats is not None)
        )
        if fleet is None:
            return
        by_model = GaugeMetricFamily(
            "imagegen_queue_depth_by_model", "Jobs waiting, by backend and model.", labels=["backend", "model"]
        )
        for route in fleet["routes"]:
            by_model.add_metric([route["backend"], route["model"]], route["queued"])
        yield by_model
        live = GaugeMetricFamily(
            "imagegen_workers_live", "Workers with a fresh heartbeat, by backend they serve.", labels=["backend"]
        )
        for backend, count in fleet["live_workers"].items():
            live.add_metric([backend], count)
        yield live
        counters = fleet["counters"]
        for name, key, text in (
            ("imagegen_fleet_lease_expiries", "lease_expired", "Leases of running jobs that lapsed (fleet-wide)."),
            ("imagegen_fleet_jobs_reclaimed", "reclaimed", "Jobs put back in the queue after a lease lapsed."),
            (
                "imagegen_fleet_jobs_failed_after_lease",
                "failed_after_lease",
                "Jobs failed after their lease lapsed SD_MAX_ATTEMPTS times.",
            ),
            (
                "imagegen_fleet_finalize_refused",
                "finalize_refused",
                "Final states refused because the job was already final (a second worker, a cancel).",
            ),
        ):
            yield CounterMetricFamily(name, text, value=counters.get(key, 0))

    def _backends(self) -> Iterator[Metric]:
        states = GaugeMetricFamily(
            "imagegen_backend_state", "1 for the state each backend is in now.", labels=["backend", "state"]
        )
        loaded = GaugeMetricFamily(
            "imagegen_backend_loaded", "1 when the backend's model is in memory.", labels=["backend"]
        )
        for backend in self.services.registry:
            health = backend.health()
            for state in BackendState:
                states.add_metric([backend.id, state.value], int(health.state is state))
            loaded.add_metric([backend.id], int(bool(health.loaded)))
        yield states
        yield loaded

    def _disk(self) -> Iterator[Metric]:
        disk = self.services.disk
        if disk is None:
            return
        snapshot = disk.snapshot()
        used = GaugeMetricFamily(
            "imagegen_disk_usage_bytes",
            "Bytes in the model and output folders (measured in the background).",
            labels=["folder"],
        )
        files = GaugeMetricFamily("imagegen_disk_files", "Files in the model and output folders.", labels=["folder"])
        free = GaugeMetricFamily(
            "imagegen_disk_free_bytes", "Free bytes on the filesystem of each folder.", labels=["folder"]
        )
        for name, folder in snapshot["folders"].items():
            if folder["bytes"] is not None:
                used.add_metric([name], folder["bytes"])
                files.add_metric([name], folder["files"])
            if folder["free_bytes"] is not None:
                free.add_metric([name], folder["free_bytes"])
        yield used
        yield files
        yield free

    def _memory(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "imagegen_process_resident_memory_bytes",
            "Resident memory of the service process (psutil; also on macOS).",
            value=psutil.Process().memory_info().rss,
        )
        registry = self.services.registry
        if registry.device_process is not None:
            rss, _ = registry.device_process.memory()
            if rss is not None:
                yield GaugeMetricFamily(
                    "imagegen_device_process_resident_memory_bytes",
                    "Resident memory of the device process the local backends run in (SD_DEVICE_ISOLATION=process).",
                    value=rss,
                )
        # Never imports torch: reported once a local backend has imported it (in the device process,
        # from its last report).
        found = registry.accelerator_memory()
        if found:
            gpu = GaugeMetricFamily(
                "imagegen_gpu_memory_bytes",
                "Accelerator memory by device and kind (allocated/reserved by torch, total), once a local backend "
                "has imported torch.",
                labels=["device", "kind"],
            )
            for device, kind, value in found:
                gpu.add_metric([device, kind], value)
            yield gpu

    def _info(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "imagegen_info", "Version and default backend of this service.", labels=["version", "default_backend"]
        )
        info.add_metric([__version__, self.services.registry.default_id], 1)
        yield info


def app_registry(services: Services, stats: dict[str, Any] | None) -> CollectorRegistry:
    """A registry holding one app's state gauges for one scrape."""
    registry = CollectorRegistry()
    registry.register(ServiceCollector(services, stats))
    return registry
