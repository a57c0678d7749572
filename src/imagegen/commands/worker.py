"""`imagegen worker`: one worker of a cluster (docs/scale-out.md).

It builds the backends it serves with `BackendRegistry.from_settings` (the same objects the service
builds), runs `Worker` (engine/distributed/worker.py) until SIGTERM or SIGINT, then lets the running
batch finish within SD_SHUTDOWN_GRACE and gives the rest back to the queue.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagegen.backends.registry import BackendFactory
    from imagegen.config import Settings


def _fail(message: str, code: int = 2) -> int:
    print(f"imagegen worker: {message}", file=sys.stderr)
    return code


def _factories(specs: list[str] | None) -> dict[str, BackendFactory]:
    """--backend-factory ID=MODULE:CALLABLE, each a callable taking the Settings."""
    found: dict[str, BackendFactory] = {}
    for spec in specs or []:
        backend_id, _, target = spec.partition("=")
        module, _, name = target.partition(":")
        if not backend_id or not module or not name:
            raise ValueError(f"--backend-factory {spec!r}: expected ID=MODULE:CALLABLE")
        factory = getattr(importlib.import_module(module), name)
        if not callable(factory):
            raise ValueError(f"--backend-factory {spec!r}: {name} is not callable")
        found[backend_id] = factory
    return found


def run(args: argparse.Namespace) -> int:
    from imagegen import preflight
    from imagegen.backends.registry import DEFAULT_FACTORIES
    from imagegen.config import SettingsError, load_settings
    from imagegen.logging_setup import configure_logging

    try:
        settings = load_settings()
    except SettingsError as error:
        return _fail(str(error))
    if not settings.distributed:
        return _fail("a worker needs a cluster: set SD_REDIS_URL (see docs/scale-out.md)")
    try:
        factories = _factories(args.backend_factory)
    except (ValueError, ImportError, AttributeError) as error:
        return _fail(str(error))
    backends = list(dict.fromkeys(args.backend or [settings.default_backend.value]))
    known = {**DEFAULT_FACTORIES, **factories}
    unknown = [backend for backend in backends if backend not in known]
    if unknown:
        return _fail(f"unknown backend {', '.join(unknown)}; known backends: {', '.join(known)}")
    findings = preflight.check(settings)
    output_errors = [problem for problem in findings.errors if "SD_OUTPUT_DIR" in problem]
    if output_errors:
        for problem in output_errors:
            print(f"imagegen worker: cannot start: {problem}", file=sys.stderr)
        return 1
    configure_logging(settings.log_level, settings.log_format)
    return asyncio.run(_serve(settings, backends, args.model or [], factories, args.name))


async def _serve(
    settings: Settings, backends: list[str], models: list[str], factories: dict[str, BackendFactory], name: str | None
) -> int:
    from imagegen.backends.registry import BackendRegistry
    from imagegen.engine.distributed.worker import Worker
    from imagegen.storage.outputs import OutputStore

    registry = BackendRegistry.from_settings(settings, factories, default_id=backends[0], only=backends)
    chosen: dict[str, list[str]] = {}
    for model in models:
        offering = [backend.id for backend in registry if model in backend.capabilities().models]
        if not offering:
            return _fail(f"no backend of this worker offers model {model!r}")
        for backend_id in offering:
            chosen.setdefault(backend_id, []).append(model)
    worker = Worker(settings, registry, OutputStore(settings.output_dir), models=chosen, name=name)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.request_stop)
    await worker.start()
    served = "; ".join(f"{backend_id}: {', '.join(names)}" for backend_id, names in worker.models.items())
    print(f"imagegen worker {worker.name} ready ({served})", file=sys.stderr, flush=True)
    await worker.wait_stopped()
    await worker.close()
    return 0
