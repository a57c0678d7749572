"""build_services: one set of services for the app and the in-process CLI, started and stopped one
way. The CLI's job store lives in memory: a CLI run never picks up (and runs) the jobs a service left
queued in SD_DATA_DIR, which the service itself resumes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from imagegen.config import Settings
from imagegen.engine.jobs import Job, JobStatus
from imagegen.engine.store import SQLiteJobStore
from imagegen.generation import GenerationParams
from imagegen.services import Services, build_services
from imagegen.storage.outputs import OutputStore
from tests.support.fake_backend import FakeBackend


def _fake(settings: Settings) -> FakeBackend:
    return FakeBackend(settings, step_delay=0.001)


def _cli_services(settings: Settings) -> Services:
    """What `imagegen generate` builds (commands/generate.py)."""
    return build_services(
        settings,
        store=SQLiteJobStore(":memory:"),
        backend_factories={"fake": _fake},
        default_backend="fake",
        upkeep=False,
    )


async def _until_final(services: Services, job_id: str, timeout: float = 30) -> Job:
    async with asyncio.timeout(timeout):
        while not (job := await services.engine.get(job_id)).status.final:
            await asyncio.sleep(0.01)
    return job


async def test_the_cli_shape_has_no_upkeep_no_webhooks_and_runs_a_job(make_settings: Callable[..., Settings]) -> None:
    services = _cli_services(make_settings())
    assert services.disk is None and services.retention is None and services.webhooks is None
    await services.start()
    try:
        job = await services.engine.submit(GenerationParams(prompt="a fox", seed=1), None)
        done = await _until_final(services, job.id)
        assert done.status is JobStatus.SUCCEEDED and done.backend == "fake"
    finally:
        await services.stop(grace=0)
    assert not (services.settings.data_dir / "jobs.sqlite3").exists()


async def test_the_service_shape_has_its_upkeep_and_webhooks(make_settings: Callable[..., Settings]) -> None:
    seen: list[tuple[str, OutputStore]] = []

    def webhook_body(job: Job, outputs: OutputStore) -> dict[str, Any]:
        seen.append((job.id, outputs))
        return {"id": job.id}

    services = build_services(
        make_settings(), backend_factories={"fake": _fake}, default_backend="fake", webhook_body=webhook_body
    )
    assert services.disk is not None and services.retention is not None and services.webhooks is not None
    await services.start()
    try:
        job = await services.engine.submit(GenerationParams(prompt="a fox", seed=1), None)
        done = await _until_final(services, job.id)
        # The sender renders with the caller's body and this instance's output store.
        assert services.webhooks.render(done) == {"id": done.id}
        assert seen == [(done.id, services.outputs)]
    finally:
        await services.stop(grace=0)
    assert (services.settings.data_dir / "jobs.sqlite3").exists()


async def test_a_cli_run_never_picks_up_the_queue_a_service_left(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(max_batch=1)
    service = build_services(settings, backend_factories={"fake": _fake}, default_backend="fake", upkeep=False)
    await service.start()
    running = await service.engine.submit(GenerationParams(prompt="slow running one", seed=1, steps=100), None)
    queued = await service.engine.submit(GenerationParams(prompt="left in the queue", seed=2), None)
    async with asyncio.timeout(10):
        while (await service.engine.get(running.id)).status is not JobStatus.RUNNING:
            await asyncio.sleep(0.01)
    await service.stop(grace=0)
    left = SQLiteJobStore(settings.data_dir / "jobs.sqlite3")
    assert left.get(queued.id).status is JobStatus.QUEUED  # type: ignore[union-attr]
    left.close()

    cli = _cli_services(settings)
    await cli.start()
    try:
        mine = await cli.engine.submit(GenerationParams(prompt="the CLI's own job", seed=3), None)
        assert (await _until_final(cli, mine.id)).status is JobStatus.SUCCEEDED
        assert [job.id for job in await cli.engine.list_jobs()] == [mine.id]
    finally:
        await cli.stop(grace=0)
    left = SQLiteJobStore(settings.data_dir / "jobs.sqlite3")
    assert left.get(queued.id).status is JobStatus.QUEUED  # type: ignore[union-attr]
    left.close()

    # The service itself resumes it.
    again = build_services(settings, backend_factories={"fake": _fake}, default_backend="fake", upkeep=False)
    await again.start()
    try:
        assert (await _until_final(again, queued.id)).status is JobStatus.SUCCEEDED
    finally:
        await again.stop(grace=0)
