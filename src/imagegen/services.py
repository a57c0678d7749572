"""The services of one running instance, built and started one way for every caller.

`build_services(settings)` makes the backend registry, job store, output store, events and engine
(and, for a long-running service, the webhook sender, output retention and the disk measurement);
`start()` and `stop()` bring them up and down in the right order. `main.create_app` serves them over
HTTP; the in-process `imagegen generate` runs one job on them with a job store in memory.

With SD_REDIS_URL the services are those of an API replica of a cluster (docs/scale-out.md): the
engine is `RedisJobEngine`, the backends are `FleetBackend` proxies (validation here, health from the
workers' heartbeats), no model is loaded and no job store is opened here. Only then is the
distributed package (and the `redis` client) imported.

This module sits between the engine and the HTTP edge (docs/architecture.md): routes receive a
`Services`, and nothing here knows HTTP; the body a webhook carries is the caller's to give.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagegen import metrics
from imagegen.backends.registry import BackendFactory, BackendRegistry
from imagegen.config import Settings
from imagegen.engine.base import Engine
from imagegen.engine.engine import JobEngine
from imagegen.engine.events import JobEvents
from imagegen.engine.job_metrics import observe_final_job
from imagegen.engine.jobs import Job
from imagegen.engine.store import JobStore, SQLiteJobStore
from imagegen.engine.webhooks import WebhookSender
from imagegen.storage.disk_usage import DiskUsage
from imagegen.storage.inputs import InputPruneTask, InputStore
from imagegen.storage.outputs import OutputStore
from imagegen.storage.retention import RetentionPolicy, RetentionTask

log = logging.getLogger("imagegen")

#: What a webhook POSTs for a finished job (the API's job body: the HTTP edge knows its shape).
WebhookBody = Callable[[Job, OutputStore], dict[str, Any]]


@dataclass
class Services:
    settings: Settings
    registry: BackendRegistry
    #: The SQLite job store (None in a cluster: the jobs are in Redis, behind the engine)
    store: JobStore | None
    outputs: OutputStore
    events: JobEvents
    engine: Engine
    #: uploaded images (init images, masks, references) by content hash (Settings.inputs_dir)
    inputs: InputStore
    #: sizes of the model and output folders, measured in the background (for /info and /metrics)
    disk: DiskUsage | None = None
    webhooks: WebhookSender | None = None
    #: deletes old outputs at start-up and every SD_OUTPUT_PRUNE_INTERVAL seconds
    retention: RetentionTask | None = None
    #: deletes input images no unfinished job refers to, at start-up (after the engine has recovered
    #: its queue) and every SD_OUTPUT_PRUNE_INTERVAL seconds
    input_retention: InputPruneTask | None = None
    #: True for an API replica of a cluster: its backends never load a model (workers do)
    distributed: bool = False

    async def start(self) -> None:
        """Backends (and the device manager they share) first, then the engine's lanes and the
        webhook deliveries left pending, then upkeep."""
        if not self.distributed:
            await self.registry.start()
        await self.engine.start()
        if self.webhooks is not None and self.store is not None:
            # Deliveries a previous process left pending (a cluster's replicas share an outbox instead).
            self.webhooks.resume(self.store)
        if self.retention is not None:
            self.retention.start()
        if self.input_retention is not None:
            self.input_retention.start()
        if self.disk is not None:
            self.disk.refresh_in_background()

    async def stop(self, grace: float | None = None) -> None:
        """Stop admitting, let running jobs finish for `grace` seconds (SD_SHUTDOWN_GRACE unless
        given), then close what holds connections, memory and files."""
        if self.retention is not None:
            await self.retention.stop()
        if self.input_retention is not None:
            await self.input_retention.stop()
        await self.engine.shutdown(self.settings.shutdown_grace if grace is None else grace)
        if self.webhooks is not None:
            await self.webhooks.close()
        await self.registry.close()
        if self.store is not None:
            self.store.close()


def build_services(
    settings: Settings,
    *,
    store: JobStore | None = None,
    backend_factories: dict[str, BackendFactory] | None = None,
    default_backend: str | None = None,
    webhook_body: WebhookBody | None = None,
    upkeep: bool = True,
    distributed: bool | None = None,
) -> Services:
    """The services of one instance.

    store: the job store (default: SQLite in SD_DATA_DIR, which a restart resumes from).
    backend_factories, default_backend: extra backends beside the standard ones, and which one a
    request naming none gets (default: SD_DEFAULT_BACKEND); an unknown default is a ValueError.
    webhook_body: what a job's callback URL receives; without it no webhook is sent (the CLI).
    upkeep: output retention and the disk measurement, the chores of a long-running service.
    distributed: an API replica of the cluster at SD_REDIS_URL (default: whether it is set); False
    for the in-process CLI, which runs its job here whatever the settings say.
    """
    cluster = settings.distributed if distributed is None else distributed
    # An API replica runs no pipeline (its workers do): its local backends only validate, so no
    # device process is set up for them.
    registry = BackendRegistry.from_settings(
        settings.model_copy(update={"device_isolation": "thread"}) if cluster else settings,
        backend_factories,
        default_id=default_backend,
    )
    outputs = OutputStore(settings.output_dir)
    events = JobEvents()
    webhooks = None
    if webhook_body is not None:
        body = webhook_body
        webhooks = WebhookSender(settings, lambda job: body(job, outputs))
    engine: Engine
    job_store: JobStore | None = None
    if cluster:
        from imagegen.engine.distributed.engine import RedisJobEngine
        from imagegen.engine.distributed.fleet import Fleet, FleetBackend

        fleet = Fleet(settings.worker_lease_seconds)
        registry = BackendRegistry(
            {backend.id: FleetBackend(backend, fleet) for backend in registry}, registry.default_id
        )
        engine = RedisJobEngine(settings, registry, outputs, events, fleet, webhooks, on_final=observe_final_job)
    else:
        job_store = store if store is not None else SQLiteJobStore(settings.data_dir / "jobs.sqlite3")
        engine = JobEngine(settings, registry, job_store, outputs, events, webhooks, on_final=observe_final_job)
    metrics.init_backends(registry.ids())
    inputs = InputStore(settings.inputs_dir)
    services = Services(
        settings, registry, job_store, outputs, events, engine, inputs, webhooks=webhooks, distributed=cluster
    )
    if upkeep:
        disk = DiskUsage({"models": settings.model_dir, "outputs": outputs.root})
        services.disk = disk
        services.retention = RetentionTask(
            outputs.root,
            RetentionPolicy.from_settings(settings),
            settings.output_prune_interval,
            after_pass=lambda report: disk.refresh_in_background() if report.removed else None,
        )
        services.input_retention = InputPruneTask(inputs, engine.inputs_in_use, settings.output_prune_interval)
    return services
