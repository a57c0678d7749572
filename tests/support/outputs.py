"""Files in an output folder with chosen ages and sizes (retention, listing and CLI tests)."""

from __future__ import annotations

import os
import time
from pathlib import Path

DAY = 86_400


def make_output(root: Path, name: str, *, size: int = 100, age: float = 0.0, now: float | None = None) -> Path:
    """A file in the output folder, `size` bytes, last modified `age` seconds ago."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    path.write_bytes(b"\x89PNG" + b"x" * max(0, size - 4))
    stamp = (now or time.time()) - age
    os.utime(path, (stamp, stamp))
    return path


def output_name(index: int, ext: str = "png") -> str:
    return f"20260101-000000-{index:012x}.{ext}"
