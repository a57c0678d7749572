"""Disk usage of the model cache and the outputs, for /info and /metrics.

Walking a model cache or a folder of many thousand images takes a while, so it happens in a
background thread and the result is cached: readers get the last measurement at once (with its
age) and, when it is stale, start a new one for the next reader. Free space (one statvfs call) is
read fresh every time.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Any

#: A measurement older than this is refreshed (in the background) by the next reader.
MAX_AGE_SECONDS = 300.0


def folder_size(root: Path) -> tuple[int, int]:
    """(bytes, files) of the regular files under root. Symlinks are not followed: the Hugging Face
    cache's snapshots/ are links into blobs/, so every file counts once."""
    total = files = 0
    for folder, dirs, names in os.walk(root, followlinks=False):
        for name in names:
            try:
                info = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
                files += 1
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
    return total, files


def free_bytes(path: Path) -> int | None:
    """Free space on the filesystem holding path (or its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


class DiskUsage:
    def __init__(self, folders: dict[str, Path], max_age: float = MAX_AGE_SECONDS) -> None:
        self.folders = {name: Path(path) for name, path in folders.items()}
        self.max_age = max_age
        self._measured: dict[str, tuple[int, int]] = {}
        self._measured_at: float | None = None
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def refresh(self) -> None:
        """Measure now (blocking: call from a worker thread)."""
        measured = {}
        for name, path in self.folders.items():
            measured[name] = folder_size(path) if path.is_dir() else (0, 0)
        with self._lock:
            self._measured = measured
            self._measured_at = time.time()

    def refresh_in_background(self) -> None:
        """Start a measurement unless one is running."""
        with self._lock:
            if self._worker is not None and self._worker.is_alive():
                return
            self._worker = threading.Thread(target=self.refresh, name="disk-usage", daemon=True)
            self._worker.start()

    def snapshot(self) -> dict[str, Any]:
        """The last measurement (None until the first one ends) and free space now; never blocks on a walk."""
        with self._lock:
            measured = dict(self._measured)
            measured_at = self._measured_at
        if measured_at is None or time.time() - measured_at > self.max_age:
            self.refresh_in_background()
        folders = {}
        for name, path in self.folders.items():
            size = measured.get(name)
            folders[name] = {
                "path": str(path.absolute()),
                "bytes": size[0] if size else None,
                "files": size[1] if size else None,
                "free_bytes": free_bytes(path),
            }
        return {
            "folders": folders,
            "measured_at": measured_at,
            "age_seconds": None if measured_at is None else round(time.time() - measured_at, 1),
        }
