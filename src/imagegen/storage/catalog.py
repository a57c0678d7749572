"""Scanning, listing and deleting stored outputs without ever leaving the output folder.

Only names that match NAME_PATTERN are outputs. A write in progress lives under a `.tmp-` name
until it is renamed into place complete, so it is never listed or deleted, and neither is anything
else an operator put in the folder. Every entry is looked at with lstat through a descriptor of the
output folder: a name has no "/" (the pattern says so), so it cannot reach outside the folder, and a
symlink is never followed, listed or deleted (it is not a file this service wrote).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagegen.errors import NotFoundError
from imagegen.storage.outputs import NAME_PATTERN


@dataclass(frozen=True)
class OutputFile:
    """One stored output as found on disk."""

    name: str
    size: int
    mtime: float


@contextlib.contextmanager
def open_folder(root: Path) -> Iterator[int]:
    """A descriptor of the output folder: names are resolved against it, never against a path string
    that could be swapped for another folder between two calls."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def scan(root: Path) -> list[OutputFile]:
    """Every stored output in `root` (regular files with an output name; no symlinks, no temp files)."""
    found: list[OutputFile] = []
    with open_folder(root) as fd, os.scandir(fd) as entries:
        for entry in entries:
            if not NAME_PATTERN.fullmatch(entry.name):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted meanwhile
            if stat.S_ISREG(info.st_mode):
                found.append(OutputFile(entry.name, info.st_size, info.st_mtime))
    return found


def delete(root: Path, name: str) -> int:
    """Delete one stored output by name; return its size. NotFoundError for anything that is not one.

    unlink() never follows a symlink, so even a file swapped for a link after the check below only
    removes that link, never what it points to."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise NotFoundError("no such image")
    with open_folder(root) as fd:
        try:
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            raise NotFoundError("no such image") from None
        if not stat.S_ISREG(info.st_mode):
            raise NotFoundError("no such image")
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            raise NotFoundError("no such image") from None
    return info.st_size


def page(root: Path, *, limit: int, before: str | None = None) -> tuple[list[OutputFile], str | None]:
    """Outputs newest first (names start with their UTC creation time), at most `limit`, only those
    whose name sorts before `before`; and the cursor for the next page (None on the last one)."""
    files = sorted(scan(root), key=lambda item: item.name, reverse=True)
    if before is not None:
        files = [item for item in files if item.name < before]
    chosen = files[:limit]
    next_before = chosen[-1].name if len(files) > limit else None
    return chosen, next_before


def read_metadata(root: Path, name: str) -> dict[str, Any] | None:
    """The parameters embedded in a stored output, or None when it has none or cannot be read.

    Opened with O_NOFOLLOW relative to the folder, for the same reasons as `delete`."""
    from imagegen.storage import metadata

    try:
        with open_folder(root) as fd:
            handle = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        with os.fdopen(handle, "rb") as file:
            return metadata.read_metadata(file)
    except Exception:  # noqa: BLE001 - a damaged or foreign file lists without metadata
        return None
