"""What a service (or a worker) and its device process say to each other (docs/operations.md, "The
device process").

One `multiprocessing` Connection carries picklable values both ways: commands to the device process
(run a batch, cancel it, load, unload, status, shut down) and events back (ready, batch started when
it really has the device, progress, result or typed error, backend health on change, replies, log
records and metric events). Plain values only: nothing here imports torch or the job engine, so the
same protocol serves the embedded service and a separate worker process.

Pixels cross the boundary as raw bytes (mode, size, bytes: a 1024x1024 RGB image is 3 MB, which a
pipe moves in milliseconds); `pack_images` / `unpack_images` are the one place that does it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imagegen import errors
from imagegen.backends.base import BackendHealth
from imagegen.generation import GeneratedImage, GenerationRequest

# -- commands: service -> device process -------------------------------------------------------------


@dataclass(frozen=True)
class RunBatch:
    """Run one pipeline call for these requests on `backend_id` (one batch on the device at a time; the
    next may be sent once the previous one is released: BatchReleased)."""

    batch_id: int
    backend_id: str
    #: the requests as the service resolved them; input images and masks are content hashes of files
    #: in Settings.inputs_dir, which the device process reads itself (same machine, same folder)
    requests: tuple[GenerationRequest, ...]
    #: seconds between two live previews the service wants (RunContext.preview_interval); 0: none
    preview_interval: float = 0.0


@dataclass(frozen=True)
class CancelBatch:
    """Stop the batch between denoising steps (it ends with a `cancelled` BatchError)."""

    batch_id: int


@dataclass(frozen=True)
class LoadBackend:
    """Begin loading the backend's model in the background (the default backend preloads)."""

    backend_id: str


@dataclass(frozen=True)
class UnloadBackend:
    """Unload the backend's pipeline; answered with a Reply(True if something was unloaded)."""

    request_id: int
    backend_id: str
    reason: str


@dataclass(frozen=True)
class RefreshBackend:
    """Forget what was learnt from disk about the models (backend.refresh(): A1111's
    refresh-checkpoints); answered with a Reply after the backend's fresh health report."""

    request_id: int
    backend_id: str


@dataclass(frozen=True)
class Shutdown:
    """Unload everything and exit."""


# -- events: device process -> service ---------------------------------------------------------------


@dataclass(frozen=True)
class HostReady:
    """The device process has built its backends and takes commands."""

    pid: int
    #: seconds from the start of the process to this message (imports, backends built)
    seconds: float
    #: what torch sees there: support.devices_seen() (the service process never imports torch)
    devices: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HostFailed:
    """The device process could not build its backends (it exits after sending this)."""

    message: str


@dataclass(frozen=True)
class BatchStarted:
    """The batch has the device now: the run deadline counts from here."""

    batch_id: int


@dataclass(frozen=True)
class BatchReleased:
    """The device is done with the batch (RunContext.release_device): its images are being finished on
    the device process's finisher thread, and the next RunBatch may run on the device meanwhile."""

    batch_id: int


@dataclass(frozen=True)
class BatchProgress:
    """A denoising step done. With `previews`, the live previews of that step (one encoded image or
    None per request of the batch, RunContext.report_preview): sent right after the step's own
    progress, so the step is not counted again."""

    batch_id: int
    step: int
    total: int
    previews: tuple[bytes | None, ...] | None = None


@dataclass(frozen=True)
class PackedImage:
    """One GeneratedImage as plain values; a flagged image has no pixels."""

    seed: int
    nsfw: bool
    info: dict[str, Any]
    mode: str | None = None
    size: tuple[int, int] | None = None
    pixels: bytes | None = None


@dataclass(frozen=True)
class BatchResult:
    batch_id: int
    images: tuple[tuple[PackedImage, ...], ...]


@dataclass(frozen=True)
class BatchError:
    batch_id: int
    #: error_to_dict() of the typed ServiceError the batch ended with
    error: dict[str, Any]


@dataclass(frozen=True)
class BackendReport:
    """A backend's health in the device process, sent when it changes (and now and then for memory)."""

    backend_id: str
    health: BackendHealth
    #: (model, details) of the loaded pipeline: native size, pipeline class... (None when unloaded)
    load: tuple[str, dict[str, Any]] | None = None
    #: accelerator memory of the device process: (device, kind, bytes), as support.accelerator_memory()
    accelerator_memory: tuple[tuple[str, str, int], ...] = ()
    rss_bytes: int | None = None


@dataclass(frozen=True)
class Reply:
    request_id: int
    value: Any = None


@dataclass(frozen=True)
class LogEvent:
    """A log record of the device process (message formatted, traceback as text), logged by the
    service with its own handlers and format."""

    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricEvent:
    """A metrics event of the device process (model loads and unloads), counted by the service."""

    name: str
    args: tuple[Any, ...] = ()


# -- pixels ------------------------------------------------------------------------------------------


def pack_images(results: list[list[GeneratedImage]]) -> tuple[tuple[PackedImage, ...], ...]:
    """The images of a batch (one list per request) as raw bytes."""
    packed = []
    for images in results:
        row = []
        for image in images:
            pixels = image.image
            if pixels is None:
                row.append(PackedImage(image.seed, image.nsfw, dict(image.info)))
            else:
                row.append(
                    PackedImage(image.seed, image.nsfw, dict(image.info), pixels.mode, pixels.size, pixels.tobytes())
                )
        packed.append(tuple(row))
    return tuple(packed)


def unpack_images(packed: tuple[tuple[PackedImage, ...], ...]) -> list[list[GeneratedImage]]:
    from PIL import Image

    results = []
    for row in packed:
        images = []
        for item in row:
            pixels = None
            if item.pixels is not None and item.mode is not None and item.size is not None:
                pixels = Image.frombytes(item.mode, item.size, item.pixels)
            images.append(GeneratedImage(seed=item.seed, image=pixels, nsfw=item.nsfw, info=dict(item.info)))
        results.append(images)
    return results


# -- errors ------------------------------------------------------------------------------------------


def error_to_dict(error: errors.ServiceError) -> dict[str, Any]:
    return {
        **error.to_dict(),
        "status_code": error.status_code,
        "headers": dict(error.headers),
        "class": type(error).__name__,
    }


def error_from_dict(data: dict[str, Any]) -> errors.ServiceError:
    """The typed error again (JobCancelledError stays a JobCancelledError: the engine tells errors
    apart by class); an unknown class becomes a ServiceError with the same status and type."""
    cls = getattr(errors, str(data.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.ServiceError)):
        cls = errors.ServiceError
    error = cls.__new__(cls)
    errors.ServiceError.__init__(
        error, str(data.get("message", "")), param=data.get("param"), headers=dict(data.get("headers") or {})
    )
    error.status_code = int(data.get("status_code", cls.status_code))
    error.error_type = str(data.get("type", cls.error_type))
    return error
