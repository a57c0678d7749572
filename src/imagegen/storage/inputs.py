"""The input store: uploaded images (init images, masks, references), stored once by content hash in
SD_DATA_DIR/inputs, so that a job refers to its inputs instead of carrying them.

A job row then holds a 64-character hash per image, not megabytes of base64; a queued edit survives a
restart (the files are on disk beside the job database); a local backend in another process reads them
from the same folder. Files are the decoded pixels re-encoded as PNG without metadata: whatever the
upload carried (EXIF, GPS, text chunks) is gone, and equal pixels are one file, whatever format they
came in.

`prune` removes inputs no unfinished job refers to, once they are older than a grace period (an upload
whose job is being admitted, or whose answer is being written, is never pulled away).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from imagegen.errors import InvalidParameterError
from imagegen.generation import InputImage
from imagegen.storage.image_decoding import pixel_digest

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger("imagegen.inputs")

_NAME = re.compile(r"^([0-9a-f]{64})\.png$")
#: Inputs younger than this are kept even when no job refers to them (see the module docstring).
GRACE_SECONDS = 3600.0


class InputMissingError(InvalidParameterError):
    """A job's input image is no longer in the store (pruned, or the data folder was changed)."""

    error_type = "input_missing"


class InputStore:
    def __init__(self, root: Path) -> None:
        """`root`: Settings.inputs_dir (SD_DATA_DIR/inputs; in a cluster, a folder every node shares)."""
        root.mkdir(parents=True, exist_ok=True)
        self.root = Path(os.path.realpath(root))

    def path(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise InputMissingError("not an input image reference", param="images")
        return self.root / f"{sha256}.png"

    def put(self, image: Image) -> InputImage:
        """Store an RGB or L image (once: equal pixels are one file); return its reference."""
        sha256 = pixel_digest(image)
        target = self.path(sha256)
        if target.exists():
            with contextlib.suppress(OSError):
                os.utime(target)  # in use again: the grace period starts over
            return InputImage(sha256=sha256, width=image.width, height=image.height)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(buffer.getvalue())
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return InputImage(sha256=sha256, width=image.width, height=image.height)

    def read_bytes(self, ref: InputImage) -> bytes:
        try:
            return self.path(ref.sha256).read_bytes()
        except OSError:
            raise InputMissingError(
                "an input image of this job is no longer stored (removed by retention); send it again",
                param="images",
            ) from None

    def open(self, ref: InputImage) -> Image:
        """The stored image, loaded (RGB, or L for a mask)."""
        from PIL import Image as PILImage

        image = PILImage.open(io.BytesIO(self.read_bytes(ref)), formats=("PNG",))
        image.load()
        return image

    def names(self) -> list[str]:
        return [name for name in os.listdir(self.root) if _NAME.match(name)]

    def prune(self, in_use: set[str], *, grace: float = GRACE_SECONDS, now: float | None = None) -> list[str]:
        """Delete inputs that no unfinished job refers to and that are older than `grace` seconds;
        return the hashes deleted."""
        now = time.time() if now is None else now
        removed: list[str] = []
        for name in self.names():
            sha256 = name[:64]
            if sha256 in in_use:
                continue
            path = self.root / name
            try:
                if now - path.lstat().st_mtime < grace:
                    continue
                path.unlink()
            except OSError:
                continue
            removed.append(sha256)
        return removed


class InputPruneTask:
    """Runs `InputStore.prune` in a worker thread at start-up and every `interval` seconds, keeping
    what `in_use()` names (the hashes unfinished jobs refer to)."""

    def __init__(self, store: InputStore, in_use: Callable[[], Awaitable[set[str]]], interval: float) -> None:
        self.store = store
        self.in_use = in_use
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="input-retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run_once(self) -> list[str]:
        removed = await asyncio.to_thread(self.store.prune, await self.in_use())
        if removed:
            log.info("retention: deleted %d unused input image(s)", len(removed))
        return removed

    async def _run(self) -> None:
        while True:
            try:
                # in_use() reads the engine's jobs (in a cluster, from Redis); the file work happens in a thread.
                in_use = await self.in_use()
                removed = await asyncio.to_thread(self.store.prune, in_use)
                if removed:
                    log.info("retention: deleted %d unused input image(s)", len(removed))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("input retention pass failed; trying again in %gs", self.interval)
            await asyncio.sleep(self.interval)
