"""The service's side of the device process (host.py): `DeviceSupervisor` starts it, sends it one batch
at a time (the next once the previous has released the device: BatchReleased), watches it, stops it
for certain and starts a new one (docs/operations.md, "The device process").

The rules it keeps:
- a batch counts as started when the device process says it has the device (`RunContext.mark_started`);
- a batch the engine gives up on (its deadline passed, every job cancelled, the caller gone) is
  first asked to stop between denoising steps; if it has not stopped within SD_DEVICE_STOP_GRACE
  seconds the device process is killed (SIGKILL) and a new one started. `generate` returns only
  once the device is free, so nothing is queued behind a call nobody waits for. A shutdown
  (`RunContext.urgent`) kills at once: the grace was the engine's;
- a device process that dies on its own fails its batch with a clear error, /health says why, and a
  new one starts (after a back-off when it keeps dying soon after starting);
- start method: on Linux a fork server that has imported torch and diffusers (preload.py), so a
  device process is a cheap fork; no CUDA context exists before any fork (importing torch creates
  none). On macOS spawn (MPS cannot be used after fork).

Nothing here imports torch: this module runs in the service process.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

from imagegen import metrics
from imagegen.backends.base import RunContext
from imagegen.backends.local import host
from imagegen.backends.local.base import LocalPipelineBackend
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
    error_from_dict,
    unpack_images,
)
from imagegen.config import Settings
from imagegen.errors import BackendUnavailableError, GenerationFailedError
from imagegen.generation import GeneratedImage, GenerationRequest

log = logging.getLogger("imagegen.device")

#: Modules the fork server imports once, before it forks any device process.
PRELOAD = ["imagegen.backends.local.preload"]
#: Longest wait for a device process to say it is ready (the first start also starts the fork
#: server, which imports torch and diffusers).
START_TIMEOUT = 300.0
#: Longest wait for a killed device process to be gone before it is given up on.
KILL_WAIT = 10.0
#: How long a device process told to shut down gets before it is killed.
SHUTDOWN_WAIT = 2.0
#: Back-off between restarts of a device process that keeps dying soon after starting.
MAX_BACKOFF = 30.0
#: A device process that lived this long before dying starts the back-off afresh.
STABLE_AFTER = 60.0


def start_method() -> str:
    """forkserver on Linux (cheap starts, nothing CUDA before a fork); spawn on macOS (MPS) and
    wherever there is no fork server."""
    if sys.platform == "darwin" or "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    return "forkserver"


def _context(method: str) -> BaseContext:
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        # Process-wide, and effective for the fork server's first start only: every supervisor of
        # this process asks for the same list.
        context.set_forkserver_preload(PRELOAD)
    return context


def class_path(backend: LocalPipelineBackend) -> str:
    """ "module:Class" of a backend, which the device process imports to build its own instance."""
    cls = type(backend)
    path = f"{cls.__module__}:{cls.__qualname__}"
    try:
        found = host.load_class(path)
    except (ImportError, AttributeError, TypeError):
        found = None
    if found is not cls:
        raise ValueError(
            f"backend '{backend.id}': its class {cls.__qualname__} must be importable as {path} to run in the "
            "device process (SD_DEVICE_ISOLATION=process); define it at module level, or use "
            "SD_DEVICE_ISOLATION=thread"
        )
    return path


def _describe_signal(number: int, expected: bool) -> str:
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    if expected:
        return f"killed ({name})"
    if number == signal.SIGKILL:
        return "killed by SIGKILL (from outside the service: the kernel's out-of-memory killer sends it)"
    if number in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGABRT, signal.SIGFPE):
        return f"crashed ({name}, in native code)"
    return f"killed by {name}"


class _Child:
    """One device process and the service's end of its Connection."""

    def __init__(self, process: BaseProcess, conn: Connection, spawned_at: float) -> None:
        self.process = process
        self.conn = conn
        self.pid = process.pid
        self.spawned_at = spawned_at  # monotonic
        self.ready_at: float | None = None
        self.start_seconds: float | None = None
        self.failure: str | None = None  # what HostFailed said
        self.stopped_for: str | None = None  # why the service stopped it (None: it ended on its own)
        self.restart = True  # start another once it has exited
        self.ready = asyncio.Event()
        self.exited = asyncio.Event()
        self._send_lock = threading.Lock()

    def send(self, message: object) -> bool:
        try:
            with self._send_lock:
                self.conn.send(message)
            return True
        except (OSError, ValueError):
            return False  # it is exiting: its exit is reported by the reader


@dataclass
class _Batch:
    id: int
    backend_id: str
    ctx: RunContext
    child: _Child
    future: asyncio.Future[list[list[GeneratedImage]]]
    #: done once the device is free of the batch: released (BatchReleased) or the batch has ended
    device_free: asyncio.Future[None]
    sent_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    stop_reason: str | None = None
    stop_requested_at: float | None = None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: a batch nobody waits for any more may still fail."""
    if not future.cancelled():
        future.exception()


class DeviceSupervisor:
    """One device process for the local backends of one service (started on first need)."""

    def __init__(self, settings: Settings, backends: dict[str, LocalPipelineBackend]) -> None:
        self.settings = settings
        #: the service-side instances: they never load, they learn load details from the reports
        self.backends = backends
        self.classes = {backend_id: class_path(backend) for backend_id, backend in backends.items()}
        #: backends each new device process begins loading at once (the default backend)
        self.preload: list[str] = []
        self.method = start_method()
        #: the devices torch sees in the device process (support.devices_seen() there), once it ran
        self.devices: dict[str, Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._child: _Child | None = None
        self._starting: asyncio.Task[None] | None = None
        self._run_lock: asyncio.Lock | None = None
        self._batch: _Batch | None = None  # the batch on the device (or waiting for it)
        #: batches released from the device whose images are finishing in the device process, by id
        self._finishing: dict[int, _Batch] = {}
        self._reports: dict[str, tuple[BackendReport, float]] = {}
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._refreshes: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._restarts = 0
        self._failures = 0  # device processes in a row that died soon after starting
        self._last_exit: tuple[str, float] | None = None
        self._retry_at: float | None = None
        self._restart_delay: float | None = None  # a start to make once the one under way has ended
        self._closed = False
        self._state = "stopped"

    # -- state ---------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """stopped (not started yet), starting, restarting, ready, failed (waiting to retry), closed."""
        return self._state

    @property
    def ready(self) -> bool:
        child = self._child
        return child is not None and child.ready.is_set() and not child.exited.is_set()

    def report(self, backend_id: str) -> tuple[BackendReport, float] | None:
        """The last health report of a backend from the running device process, and when it came."""
        return self._reports.get(backend_id)

    def memory(self) -> tuple[int | None, tuple[tuple[str, str, int], ...]]:
        """(RSS, accelerator memory) of the device process, from its last report."""
        # Only a loaded backend's report measures the process (an unloaded one says nothing of memory).
        measured = [item for item in self._reports.values() if item[0].rss_bytes is not None]
        latest = max(measured or self._reports.values(), key=lambda item: item[1], default=None)
        if latest is None:
            return None, ()
        return latest[0].rss_bytes, latest[0].accelerator_memory

    def unavailable_reason(self) -> str:
        if self._closed:
            return "the service is stopping"
        reason = self._last_exit[0] if self._last_exit else "it has not started"
        if self._state == "failed" and self._retry_at is not None:
            wait = max(0.0, self._retry_at - time.monotonic())
            return f"the device process is not running ({reason}); the next start is in {wait:.0f} s"
        return f"the device process is not running ({reason})"

    def describe(self) -> dict[str, Any]:
        """For /health and /api/backends: the process, its restarts, and the batch on the device."""
        now = time.monotonic()
        child = self._child
        data: dict[str, Any] = {
            "isolation": "process",
            "start_method": self.method,
            "state": self._state,
            "pid": child.pid if child is not None else None,
            "start_seconds": child.start_seconds if child is not None else None,
            "restarts": self._restarts,
            # Reports come at least every second from a live device process: a growing age means it is stuck.
            "last_report_seconds_ago": None,
            "last_exit": None,
            "batch": None,
        }
        latest = max((received for _, received in self._reports.values()), default=None)
        if latest is not None:
            data["last_report_seconds_ago"] = round(now - latest, 1)
        if self._last_exit is not None:
            reason, when = self._last_exit
            data["last_exit"] = {"reason": reason, "seconds_ago": round(now - when, 1)}
        batch = self._batch
        if batch is not None:
            state = "stopping" if batch.stop_requested_at else ("running" if batch.started_at else "waiting")
            data["batch"] = {
                "backend": batch.backend_id,
                "state": state,
                "seconds": round(now - (batch.started_at or batch.sent_at), 1),
                "stop_reason": batch.stop_reason,
                "stop_requested_seconds_ago": (
                    round(now - batch.stop_requested_at, 1) if batch.stop_requested_at else None
                ),
            }
        return data

    # -- starting ------------------------------------------------------------------------------
    async def start(self, preload: str | None = None) -> None:
        """Start the device process (in the background) unless it runs; `preload`: a backend that
        begins loading in every device process from now on."""
        self._bind()
        if preload is not None and preload not in self.preload:
            self.preload.append(preload)
            if self.ready and self._child is not None:
                self._child.send(LoadBackend(preload))
        self._ensure_starting()

    async def until_available(self) -> None:
        """Return when a device process is ready, or when none can be had now (closed, or waiting
        out a back-off after failures: `run` then fails fast with the reason)."""
        self._bind()
        while not self._closed and not self.ready:
            self._ensure_starting()
            task = self._starting
            if task is None or self._state == "failed":
                return
            await asyncio.shield(task)

    def _bind(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
            self._run_lock = asyncio.Lock()

    def _ensure_starting(self, delay: float = 0.0) -> None:
        if self._closed or self._child is not None:
            return
        if self._starting is not None and not self._starting.done():
            # A start is under way (its process may just have died): the next one follows it.
            self._restart_delay = delay
            return
        assert self._loop is not None
        self._starting = self._loop.create_task(self._start(delay), name="device-process-start")
        self._starting.add_done_callback(self._after_start)

    def _after_start(self, task: asyncio.Task[None]) -> None:
        delay, self._restart_delay = self._restart_delay, None
        if not task.cancelled() and task.exception() is not None:
            log.error("device process start failed", exc_info=task.exception())
        if delay is not None:
            self._ensure_starting(delay)

    async def _start(self, delay: float) -> None:
        if delay > 0:
            self._state = "failed"
            self._retry_at = time.monotonic() + delay
            await asyncio.sleep(delay)
        self._retry_at = None
        self._state = "restarting" if self._restarts or self._last_exit else "starting"
        context = _context(self.method)
        parent_end, child_end = context.Pipe()
        process = context.Process(  # type: ignore[attr-defined]
            target=host.serve,
            args=(child_end, self.settings, self.classes, list(self.preload), dict(os.environ), time.time()),
            name="imagegen-device",
            daemon=True,
        )
        began = time.monotonic()
        loop = asyncio.get_running_loop()
        # Blocking: the fork server's first start imports torch (seconds); later starts are forks.
        starting = loop.run_in_executor(None, process.start)
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            # Closed while starting: the process must not outlive the service.
            starting.add_done_callback(lambda _: _kill_started(process, parent_end))
            raise
        except Exception as error:  # noqa: BLE001 - no device process: shown in /health, retried with back-off
            parent_end.close()
            log.error("device process could not be started: %s: %s", type(error).__name__, error)
            self._last_exit = (f"could not be started: {type(error).__name__}", time.monotonic())
            self._failures += 1
            self._restart_delay = self._backoff()
            return
        finally:
            child_end.close()
        child = _Child(process, parent_end, began)
        if self._closed:
            _kill_started(process, parent_end)
            return
        self._child = child
        threading.Thread(target=self._read, args=(child, loop), name=f"device-reader-{child.pid}", daemon=True).start()
        ready = loop.create_task(child.ready.wait())
        exited = loop.create_task(child.exited.wait())
        try:
            done, _ = await asyncio.wait({ready, exited}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            exited.cancel()
        if not done:
            log.error("device process pid=%s was not ready within %g s; killing it", child.pid, START_TIMEOUT)
            self._kill(child, f"not ready within {START_TIMEOUT:g} s", expected=False)

    def _backoff(self) -> float:
        return 0.0 if self._failures <= 1 else min(MAX_BACKOFF, 2.0 ** (self._failures - 2))

    # -- the reader thread and the messages ----------------------------------------------------
    def _read(self, child: _Child, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                message = child.conn.recv()
            except (EOFError, OSError):
                break
            except Exception:
                log.exception("device process pid=%s sent an unreadable message", child.pid)
                continue
            try:
                loop.call_soon_threadsafe(self._on_message, child, message)
            except RuntimeError:
                return  # the service's loop is closed: nobody listens any more
        child.process.join(KILL_WAIT)  # its exit status (the process has closed its end: it is ending)
        try:
            loop.call_soon_threadsafe(self._on_exit, child)
        except RuntimeError:
            pass

    def _on_message(self, child: _Child, message: object) -> None:
        if isinstance(message, LogEvent):
            self._log(message.record)
            return
        if isinstance(message, MetricEvent):
            if message.name in metrics.FORWARDED:
                getattr(metrics, message.name)(*message.args)
            return
        if child is not self._child:
            return  # from a device process already replaced
        batch_id = getattr(message, "batch_id", None)
        batch = self._batch if self._batch is not None and self._batch.id == batch_id else None
        if batch is None and isinstance(batch_id, int):
            batch = self._finishing.get(batch_id)
        if isinstance(message, BackendReport):
            self._on_report(message)
        elif isinstance(message, HostReady):
            child.ready_at = time.monotonic()
            child.start_seconds = message.seconds
            self.devices = dict(message.devices)
            self._state = "ready"
            log.info("device process pid=%s ready in %.2f s (%s)", message.pid, message.seconds, self.method)
            child.ready.set()
        elif isinstance(message, HostFailed):
            child.failure = message.message
            log.error("%s", message.message)
        elif batch is None:
            if isinstance(message, Reply) and message.request_id in self._replies:
                future = self._replies.pop(message.request_id)
                if not future.done():
                    future.set_result(message.value)
        elif isinstance(message, BatchStarted):
            batch.started_at = time.monotonic()
            batch.ctx.mark_started()
        elif isinstance(message, BatchProgress):
            if message.previews is None:
                batch.ctx.report_step(message.step, message.total)
            else:  # the step itself came just before
                batch.ctx.report_preview(message.step, message.total, message.previews)
        elif isinstance(message, BatchReleased):
            batch.ctx.release_device()
            _resolve(batch.device_free)
        elif isinstance(message, BatchResult):
            if not batch.future.done():
                batch.future.set_result(unpack_images(message.images))
        elif isinstance(message, BatchError) and not batch.future.done():
            batch.future.set_exception(error_from_dict(message.error))

    def _on_report(self, report: BackendReport) -> None:
        self._reports[report.backend_id] = (report, time.monotonic())
        backend = self.backends.get(report.backend_id)
        if backend is None:
            return
        if report.load is not None:
            backend.adopt_load_details(*report.load)
        if report.health.model:
            backend.model_id = report.health.model  # sd may have switched models (SD_MODELS)

    @staticmethod
    def _log(data: dict[str, Any]) -> None:
        record = logging.makeLogRecord(data)
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)

    def _on_exit(self, child: _Child) -> None:
        if child.exited.is_set():
            return
        child.exited.set()
        _close_quietly(child.conn)
        code = child.process.exitcode
        expected = child.stopped_for is not None
        if child.failure is not None:
            reason = child.failure
        elif code is None:
            reason = "did not exit after SIGKILL (abandoned)"
        elif code < 0:
            reason = _describe_signal(-code, expected)
        else:
            reason = f"exited with status {code}"
        if expected:
            reason = f"{reason}: {child.stopped_for}"
        now = time.monotonic()
        self._last_exit = (reason, now)
        if self._child is child:
            self._child = None
            self._reports.clear()  # they described the process that is gone
        (log.info if expected else log.error)("device process pid=%s ended: %s", child.pid, reason)
        for batch in (self._batch, *self._finishing.values()):
            if batch is None or batch.child is not child or batch.future.done():
                continue
            if expected:
                batch.future.set_exception(BackendUnavailableError(f"the device process was stopped: {reason}"))
            else:
                batch.future.set_exception(
                    GenerationFailedError(
                        f"the device process died while running this batch ({reason}); a new one is starting"
                    )
                )
        for future in self._replies.values():
            if not future.done():
                future.set_exception(BackendUnavailableError(f"the device process ended: {reason}"))
        self._replies.clear()
        if self._closed or not child.restart:
            self._state = "closed" if self._closed else "stopped"
            return
        lived = now - (child.ready_at or child.spawned_at)
        if expected:
            self._failures = 0
        elif child.ready_at is None or lived < STABLE_AFTER:
            self._failures += 1
        else:
            self._failures = 1
        self._restarts += 1
        self._ensure_starting(self._backoff())

    def _kill(self, child: _Child, reason: str, *, expected: bool = True, restart: bool = True) -> None:
        if expected and child.stopped_for is None:
            child.stopped_for = reason
        child.restart = child.restart and restart
        if child.process.exitcode is None:
            try:
                child.process.kill()
            except (OSError, ValueError, AttributeError):
                pass

    # -- batches -------------------------------------------------------------------------------
    async def run(
        self, backend_id: str, requests: list[GenerationRequest], ctx: RunContext
    ) -> list[list[GeneratedImage]]:
        """Run one batch in the device process. Cancelling the caller stops the batch (see the module
        docstring) and returns only once the device is free. Once the device process has released the
        device (BatchReleased: the images are being finished there), the next batch may be sent while
        this call waits for the images; at most one batch finishes at a time (the engine's lane)."""
        self._bind()
        assert self._run_lock is not None
        async with self._run_lock:
            await self.until_available()
            child = self._child
            if child is None or not self.ready:
                raise BackendUnavailableError(self.unavailable_reason())
            loop = asyncio.get_running_loop()
            batch = _Batch(next(self._ids), backend_id, ctx, child, loop.create_future(), loop.create_future())
            batch.future.add_done_callback(_retrieve)
            batch.future.add_done_callback(lambda _: _resolve(batch.device_free))
            self._batch = batch
            try:
                if not child.send(
                    RunBatch(batch.id, backend_id, tuple(requests), ctx.preview_interval if ctx.wants_previews else 0.0)
                ):
                    raise BackendUnavailableError(self.unavailable_reason())
                await self._outcome(batch)
                if not batch.future.done():
                    self._finishing[batch.id] = batch  # its messages still route to it
            finally:
                if self._batch is batch:
                    self._batch = None
        try:
            # Off the device: a cancel here only stops waiting (the images come and are dropped).
            return await asyncio.shield(batch.future)
        finally:
            self._finishing.pop(batch.id, None)

    async def _outcome(self, batch: _Batch) -> None:
        """Wait until the device is free of the batch; a cancel stops the batch first."""
        try:
            await asyncio.shield(batch.device_free)
        except asyncio.CancelledError:
            stopper = asyncio.ensure_future(self._stop(batch))
            while not stopper.done():
                try:
                    await asyncio.shield(stopper)
                except asyncio.CancelledError:
                    if batch.ctx.urgent:  # a shutdown while a stop was under way: now
                        self._kill(batch.child, "the service is shutting down", restart=False)
            raise

    async def _stop(self, batch: _Batch) -> None:
        """Stop the batch: between steps if the device process manages it within the grace, else kill."""
        ctx = batch.ctx
        reason = ctx.stop_reason or "cancelled"
        batch.stop_reason = reason
        batch.stop_requested_at = time.monotonic()
        if batch.device_free.done():
            return
        child = batch.child
        grace = self.settings.device_stop_grace
        jobs = ",".join(ctx.job_ids)
        if not ctx.urgent and grace > 0 and child.send(CancelBatch(batch.id)):
            log.info("device: stopping batch of job(s) %s (%s) between denoising steps", jobs, reason)
            # Released counts as stopped: what is left (its images being finished) does not hold the device.
            stopped, _ = await asyncio.wait({batch.device_free}, timeout=grace)
            if stopped:
                log.info(
                    "device: batch of job(s) %s stopped after %.2f s; the device is free",
                    jobs,
                    time.monotonic() - batch.stop_requested_at,
                )
                return
            log.warning(
                "device: batch of job(s) %s did not stop within %g s (SD_DEVICE_STOP_GRACE); killing device process "
                "pid=%s (a new one starts; models load again)",
                jobs,
                grace,
                child.pid,
            )
            self._kill(child, f"job(s) {jobs} {reason}; not stopped within SD_DEVICE_STOP_GRACE")
        else:
            log.warning("device: killing device process pid=%s now (%s; job(s) %s)", child.pid, reason, jobs)
            self._kill(child, f"job(s) {jobs} {reason}", restart=not ctx.urgent)
        done, _ = await asyncio.wait({batch.future}, timeout=KILL_WAIT)
        if not done:
            log.error("device process pid=%s still there %g s after SIGKILL; giving up on it", child.pid, KILL_WAIT)
            self._on_exit(child)
        else:
            log.info("device: the device is free %.2f s after the stop", time.monotonic() - batch.stop_requested_at)

    # -- commands answered by the device process -----------------------------------------------
    async def unload(self, backend_id: str, reason: str = "unloaded on request") -> bool:
        """Unload a backend's pipeline in the device process; True when something was unloaded."""
        child = self._child
        if child is None or not self.ready:
            return False
        loop = asyncio.get_running_loop()
        request_id = next(self._ids)
        future: asyncio.Future[Any] = loop.create_future()
        self._replies[request_id] = future
        try:
            if not child.send(UnloadBackend(request_id, backend_id, reason)):
                return False
            return bool(await asyncio.wait_for(future, 120))
        finally:
            self._replies.pop(request_id, None)

    async def refresh(self, backend_id: str) -> None:
        """The backend in the device process looks at its models on disk again; returns once its fresh
        health report is here (a running device process only: a new one reads the disk anyway)."""
        child = self._child
        if child is None or not self.ready:
            return
        loop = asyncio.get_running_loop()
        request_id = next(self._ids)
        future: asyncio.Future[Any] = loop.create_future()
        self._replies[request_id] = future
        try:
            if child.send(RefreshBackend(request_id, backend_id)):
                await asyncio.wait_for(future, 10)
        except TimeoutError:
            log.warning("device: backend=%s did not answer a refresh within 10 s", backend_id)
        finally:
            self._replies.pop(request_id, None)

    def refresh_blocking(self, backend_id: str, timeout: float = 15) -> None:
        """`refresh` from any thread: waits for it from another thread than the service's loop, and
        only starts it from the loop's own thread (which must not block)."""
        loop = self._loop
        if loop is None or self._child is None:
            return
        if threading.get_ident() == self._loop_thread:
            task = loop.create_task(self.refresh(backend_id))
            self._refreshes.add(task)
            task.add_done_callback(self._refreshes.discard)
            return
        asyncio.run_coroutine_threadsafe(self.refresh(backend_id), loop).result(timeout)

    def unload_blocking(self, backend_id: str, reason: str = "unloaded on request", timeout: float = 120) -> bool:
        """`unload` from another thread than the service's loop (a test, a maintenance thread)."""
        loop = self._loop
        if loop is None or self._child is None:
            return False
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError("unload_blocking() would block the event loop: await unload() instead")
        return asyncio.run_coroutine_threadsafe(self.unload(backend_id, reason), loop).result(timeout)

    # -- stopping ------------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop the device process (asked first, killed after SHUTDOWN_WAIT s) and start no other."""
        if self._closed:
            return
        self._closed = True
        starting = self._starting
        if starting is not None and not starting.done():
            starting.cancel()
        child = self._child
        if child is not None:
            child.restart = False
            if child.stopped_for is None:
                child.stopped_for = "the service stopped"
            child.send(Shutdown())
            try:
                await asyncio.wait_for(child.exited.wait(), SHUTDOWN_WAIT)
            except TimeoutError:
                self._kill(child, "the service stopped", restart=False)
                try:
                    await asyncio.wait_for(child.exited.wait(), KILL_WAIT)
                except TimeoutError:
                    self._on_exit(child)
        self._state = "closed"


def _kill_started(process: BaseProcess, conn: Connection) -> None:
    if process.pid is not None and process.exitcode is None:
        process.kill()
    _close_quietly(conn)


def _close_quietly(conn: Connection) -> None:
    try:
        conn.close()
    except OSError:
        pass
