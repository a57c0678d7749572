"""A small progress bar on stderr for the CLI (denoising steps).

On a terminal it redraws one line; otherwise (a log file, a CI job, a test) it prints one line per
step, so the progress is still visible without escape characters.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


class ProgressBar:
    def __init__(self, label: str, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.monotonic()
        self._last: tuple[int, int] | None = None
        self._open_line = False

    def note(self, text: str) -> None:
        """A status line (queued, loading...) between bar updates."""
        if not self.enabled:
            return
        self._end_line()
        print(f"{self.label}: {text}", file=self.stream, flush=True)

    def update(self, step: int, total: int) -> None:
        if not self.enabled or total <= 0 or (step, total) == self._last:
            return
        self._last = (step, total)
        done = min(WIDTH, round(WIDTH * step / total))
        elapsed = time.monotonic() - self.started
        line = f"{self.label} [{'#' * done}{'.' * (WIDTH - done)}] step {step}/{total} {elapsed:.1f}s"
        if self.tty:
            print("\r" + line, end="", file=self.stream, flush=True)
            self._open_line = True
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        self._end_line()

    def _end_line(self) -> None:
        if self._open_line:
            print(file=self.stream, flush=True)
            self._open_line = False
