"""The device process: the local backends (`sd`, `flux-local`) and the DeviceManager they share, in a
child process that the service's DeviceSupervisor (supervisor.py) starts, watches, stops and
restarts (docs/operations.md, "The device process").

A pipeline call cannot be interrupted between its own operations, so a deadline, a cancel or a
shutdown is certain only at a process boundary: whatever the device is doing, the supervisor can end
it with SIGKILL and start a new process. This side knows nothing of jobs, queues or HTTP: it builds
its backends from settings and class paths ("module:Class"), runs batches one at a time on the device
(a batch reports BatchReleased once the device is done with it, and the next may run while its images
are finished) and answers commands over one Connection (protocol.py). A future worker process can
drive it the same way.

Threads here: the asyncio loop (commands, batches, health reports), one reader thread (the
Connection), the backends' device thread (pipeline calls), the finisher thread (images off the device,
finisher.py) and their load threads. Everything sent
goes through `send`, which serialises writers.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, cast

from imagegen import metrics
from imagegen.backends.base import RunContext
from imagegen.backends.local.base import LocalPipelineBackend
from imagegen.backends.local.device_manager import DeviceManager
from imagegen.backends.local.protocol import (
    BackendReport,
    BatchError,
    BatchProgress,
    BatchReleased,
    BatchResult,
    BatchStarted,
    CancelBatch,
    HostFailed,
    HostReady,
    LoadBackend,
    LogEvent,
    MetricEvent,
    RefreshBackend,
    Reply,
    RunBatch,
    Shutdown,
    UnloadBackend,
    error_to_dict,
    pack_images,
)
from imagegen.config import Settings
from imagegen.errors import BackendUnavailableError, GenerationFailedError, ServiceError
from imagegen.storage.loras import LoraCatalog

log = logging.getLogger("imagegen.device")

#: How often backend health is compared with what was last reported, and the longest silence
#: (the service shows memory from these reports, and reads them as a heartbeat).
REPORT_INTERVAL = 0.1
REPORT_REFRESH = 1.0

#: Log record attributes passed on as they are (the rest: plain values only).
_PLAIN = (str, int, float, bool, type(None))


def serve(
    conn: Connection,
    settings: Settings,
    backend_classes: dict[str, str],
    preload: list[str],
    environ: dict[str, str],
    spawned_at: float,
) -> None:
    """The device process's entry point (the target the supervisor starts).

    `environ` is the service's environment now: a fork server's children would otherwise inherit
    the environment the fork server started with. `spawned_at` is the service's time.time() when
    it asked for the process (the start time it reports)."""
    # Ctrl+C reaches the whole process group: the service decides when the device stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.clear()
    os.environ.update(environ)
    host = DeviceHost(conn, settings)
    try:
        host.build(backend_classes)
    except Exception as error:  # noqa: BLE001 - reported to the service, which shows it in /health
        host.send(HostFailed(f"the device process could not build its backends: {type(error).__name__}: {error}"))
        os._exit(1)
    try:
        asyncio.run(host.serve(preload, spawned_at))
    except BaseException:  # logged (through the service) and exit non-zero: the service starts another
        log.exception("the device process failed")
        os._exit(1)
    os._exit(0)


def _devices() -> dict[str, Any]:
    """What torch sees here. Imported first: under spawn a load thread may be importing torch right now,
    and a half-imported module must not be read (a fork server's child has it already)."""
    from imagegen.backends.local.support import devices_seen

    try:
        import torch  # noqa: F401 - imported for its side effect: complete before it is read
    except ImportError:
        pass
    return devices_seen()


def load_class(path: str) -> type[LocalPipelineBackend]:
    """The backend class named "package.module:Class"."""
    module_name, _, qualname = path.partition(":")
    found: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        found = getattr(found, part)
    if not (isinstance(found, type) and issubclass(found, LocalPipelineBackend)):
        raise TypeError(f"{path} is not a local pipeline backend class")
    return found


class _ForwardingHandler(logging.Handler):
    """Hands every log record to the service, which logs it with its own handlers and format."""

    def __init__(self, host: DeviceHost) -> None:
        super().__init__()
        self.host = host

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = {key: value for key, value in record.__dict__.items() if isinstance(value, _PLAIN)}
            data["msg"] = record.getMessage()
            data["args"] = None
            data.pop("message", None)
            if record.exc_info:
                data["exc_text"] = logging.Formatter().formatException(record.exc_info)
            self.host.send(LogEvent(data))
        except Exception:  # noqa: BLE001 - logging must never raise into the code that logs
            self.handleError(record)


class DeviceHost:
    """The command loop of one device process."""

    def __init__(self, conn: Connection, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings
        self.backends: dict[str, LocalPipelineBackend] = {}
        self.manager: DeviceManager | None = None
        self._send_lock = threading.Lock()
        self._batches: dict[int, RunContext] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._reported: dict[str, tuple[str, float]] = {}  # backend id -> (signature, monotonic time sent)
        self._report_lock = threading.RLock()  # reports come from the loop, the log handler, any thread

    # -- set-up --------------------------------------------------------------------------------
    def build(self, backend_classes: dict[str, str]) -> None:
        handler = _ForwardingHandler(self)
        root = logging.getLogger("imagegen")
        root.handlers[:] = [handler]
        root.setLevel(self.settings.log_level.upper())
        root.propagate = False
        for noisy in ("diffusers", "transformers", "huggingface_hub", "httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        metrics.forward_events(lambda name, args: self.send(MetricEvent(name, args)))
        for backend_id, path in backend_classes.items():
            # Local backend classes are built from the settings alone (sd, flux-local, test doubles).
            build = cast(Callable[[Settings], LocalPipelineBackend], load_class(path))
            backend = build(self.settings)
            if backend.id != backend_id:
                raise ValueError(f"{path} builds backend '{backend.id}', not '{backend_id}'")
            # A load, a failure or an unload is in the service's /health before anything said later
            # (its log line, a reply) reaches the service.
            backend.on_change = self.report_changes
            self.backends[backend_id] = backend
        # One LoRA folder cache (headers, hashes) for the backends here, as the service's registry does.
        catalog = LoraCatalog(self.settings.lora_folder)
        for backend in self.backends.values():
            backend.lora_catalog = catalog
        self.manager = DeviceManager.share(self.settings, self.backends.values())

    def send(self, message: object) -> None:
        try:
            with self._send_lock:
                self.conn.send(message)
        except (OSError, ValueError):
            os._exit(0)  # the service is gone: nobody is left to work for

    # -- the loop ------------------------------------------------------------------------------
    async def serve(self, preload: list[str], spawned_at: float) -> None:
        loop = asyncio.get_running_loop()
        commands: asyncio.Queue[object] = asyncio.Queue()
        threading.Thread(target=self._read, args=(loop, commands), name="device-commands", daemon=True).start()
        assert self.manager is not None
        self.manager.start()
        for backend_id in preload:
            self._load(backend_id)
        self._report_all(force=True)  # the first reports say "loading" before the service counts us ready
        self.send(HostReady(os.getpid(), round(time.time() - spawned_at, 3), _devices()))
        reporter = loop.create_task(self._report_forever(), name="device-reports")
        try:
            while True:
                command = await commands.get()
                if isinstance(command, Shutdown):
                    # Exit now, never waiting for the device thread: a pipeline call that never
                    # returns must not keep the process alive; the OS takes the memory back at once.
                    os._exit(0)
                self._dispatch(command)
        finally:
            reporter.cancel()

    def _read(self, loop: asyncio.AbstractEventLoop, commands: asyncio.Queue[object]) -> None:
        while True:
            try:
                command: object = self.conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the service is gone (closed its end or died)
            loop.call_soon_threadsafe(commands.put_nowait, command)

    def _dispatch(self, command: object) -> None:
        if isinstance(command, RunBatch):
            self._spawn(self._run(command, self._context(command)))
        elif isinstance(command, CancelBatch):
            ctx = self._batches.get(command.batch_id)
            if ctx is not None:
                ctx.cancel_all()  # the step callback raises at the next step boundary
        elif isinstance(command, LoadBackend):
            self._load(command.backend_id)
        elif isinstance(command, UnloadBackend):
            self._spawn(self._unload(command))
        elif isinstance(command, RefreshBackend):
            refreshed = self.backends.get(command.backend_id)
            if refreshed is not None:
                refreshed.refresh()
                self._report(refreshed, force=True)  # before the reply: the service's next /health has it
            self.send(Reply(command.request_id, refreshed is not None))
        else:
            log.warning("device process: unknown command %s", type(command).__name__)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- commands ------------------------------------------------------------------------------
    def _load(self, backend_id: str) -> None:
        backend = self.backends.get(backend_id)
        if backend is not None and not backend.dependencies_missing:
            backend.begin_load()

    def _context(self, command: RunBatch) -> RunContext:
        """The batch's RunContext, registered at once: a CancelBatch right behind the RunBatch finds it.
        Previews are made here only when the service wants them (the step callback asks `preview_due`)."""
        batch_id = command.batch_id

        def on_preview(step: int, total: int, previews: Sequence[bytes | None]) -> None:
            self.send(BatchProgress(batch_id, step, total, tuple(previews)))

        ctx = RunContext(
            [str(index) for index in range(len(command.requests))],
            on_progress=lambda step, total: self.send(BatchProgress(batch_id, step, total)),
            on_started=lambda: self.send(BatchStarted(batch_id)),
            on_released=lambda: self.send(BatchReleased(batch_id)),
            on_preview=on_preview if command.preview_interval > 0 else None,
            preview_interval=command.preview_interval,
        )
        self._batches[batch_id] = ctx
        return ctx

    async def _run(self, command: RunBatch, ctx: RunContext) -> None:
        batch_id = command.batch_id
        backend = self.backends.get(command.backend_id)
        if backend is None:
            self._batches.pop(batch_id, None)
            error = BackendUnavailableError(f"backend '{command.backend_id}' does not run in the device process")
            self.send(BatchError(batch_id, error_to_dict(error)))
            return
        message: object
        try:
            results = await backend.generate(list(command.requests), ctx)
            message = BatchResult(batch_id, pack_images(results))
        except ServiceError as error:
            message = BatchError(batch_id, error_to_dict(error))
        except Exception:
            log.exception("backend=%s raised an unexpected error", backend.id)
            message = BatchError(
                batch_id, error_to_dict(GenerationFailedError("the backend failed unexpectedly; see the service log"))
            )
        finally:
            self._batches.pop(batch_id, None)
        self._report(backend, force=True)  # loaded now, maybe another model: before the result
        self.send(message)

    async def _unload(self, command: UnloadBackend) -> None:
        backend = self.backends.get(command.backend_id)
        done = False
        if backend is not None:
            done = await asyncio.get_running_loop().run_in_executor(None, backend.unload, command.reason)
            self._report(backend, force=True)
        self.send(Reply(command.request_id, done))

    # -- health --------------------------------------------------------------------------------
    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            self._report_all()

    def _report_all(self, force: bool = False) -> None:
        for backend in self.backends.values():
            self._report(backend, force)

    def report_changes(self) -> None:
        """Send the health of every backend whose health changed since its last report (any thread)."""
        if self.backends:
            self._report_all()

    def _report(self, backend: LocalPipelineBackend, force: bool = False) -> None:
        with self._report_lock:
            self._report_locked(backend, force)

    def _report_locked(self, backend: LocalPipelineBackend, force: bool) -> None:
        from imagegen.backends.local.support import accelerator_memory

        health = backend.health()
        data = health.to_dict()
        memory = data.pop("memory", None) or {}
        unload = data.get("last_unload")
        if isinstance(unload, dict):
            data["last_unload"] = {key: value for key, value in unload.items() if key != "seconds_ago"}
        signature = repr(sorted(data.items(), key=lambda item: item[0]))
        now = time.monotonic()
        last = self._reported.get(backend.id)
        if not force and last is not None and last[0] == signature and now - last[1] < REPORT_REFRESH:
            return
        self._reported[backend.id] = (signature, now)
        self.send(
            BackendReport(
                backend.id,
                health,
                backend.shareable_load_details(),
                tuple(accelerator_memory()),
                memory.get("rss_bytes"),
            )
        )
