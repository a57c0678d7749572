"""GET /metrics: Prometheus exposition (behind the API key unless SD_METRICS_PUBLIC=true).

The process-wide event counters live in imagegen/metrics.py; the state of this app (queue, backends,
disk, memory) is read from its services at scrape time by `ServiceCollector`, kept in a registry of
this app (`app_registry`), so nothing goes stale and two apps in one process never mix their queues.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import psutil
from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imagegen import __version__, metrics
from imagegen.backends.base import BackendState
from imagegen.services import Services

log = logging.getLogger("imagegen.metrics")

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def prometheus_metrics(request: Request) -> Response:
    """Prometheus metrics: requests, jobs, queue, timings, images, model loads, BFL errors, disk, memory."""
    return Response(metrics.render(request.app.state.metrics_registry), media_type=metrics.CONTENT_TYPE)


class ServiceCollector(Collector):
    """Gauges read from one app's services whenever /metrics is scraped."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        for part in (self._engine, self._backends, self._disk, self._memory, self._info):
            try:
                yield from part()
            except Exception:
                log.warning("metrics: %s failed", part.__name__, exc_info=True)

    def _engine(self) -> Iterator[Metric]:
        stats = self.services.engine.stats()
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


def app_registry(services: Services) -> CollectorRegistry:
    """A registry holding one app's state gauges."""
    registry = CollectorRegistry()
    registry.register(ServiceCollector(services))
    return registry
