"""Output retention: SD_OUTPUT_RETENTION_DAYS and SD_OUTPUT_MAX_GB, oldest first.

Which files are candidates, and how they are deleted, is storage.catalog's business (stored outputs
only, never a symlink, never outside the folder). This module decides which of them go: those older
than the age limit, then the oldest of the rest until the total fits the size limit. Files modified
in the last few minutes are never deleted: a caller may still be reading the image it was just sent
a link to, or a webhook may be about to deliver it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from imagegen.errors import NotFoundError
from imagegen.storage import catalog
from imagegen.storage.catalog import OutputFile

if TYPE_CHECKING:
    from imagegen.config import Settings

log = logging.getLogger("imagegen.retention")

#: Files younger than this are kept whatever the limits say (see the module docstring).
RECENT_SECONDS = 300.0
GB = 1_000_000_000
DAY = 86_400.0


@dataclass(frozen=True)
class RetentionPolicy:
    max_age_days: float = 0.0
    max_bytes: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        return cls(settings.output_retention_days, int(settings.output_max_gb * GB))

    @property
    def active(self) -> bool:
        return self.max_age_days > 0 or self.max_bytes > 0

    def describe(self) -> str:
        parts = []
        if self.max_age_days > 0:
            parts.append(f"older than {self.max_age_days:g} day(s)")
        if self.max_bytes > 0:
            parts.append(f"beyond {self.max_bytes / GB:g} GB")
        return " or ".join(parts) or "nothing (no limit set)"


@dataclass
class PruneReport:
    expired: list[OutputFile] = field(default_factory=list)
    over_size: list[OutputFile] = field(default_factory=list)
    #: Kept only because they are younger than RECENT_SECONDS: the limits alone would delete them.
    protected: list[OutputFile] = field(default_factory=list)
    kept_files: int = 0
    kept_bytes: int = 0
    dry_run: bool = False

    @property
    def removed(self) -> list[OutputFile]:
        return self.expired + self.over_size

    @property
    def freed_bytes(self) -> int:
        return sum(item.size for item in self.removed)


def plan(files: list[OutputFile], policy: RetentionPolicy, now: float) -> tuple[list[OutputFile], list[OutputFile]]:
    """(expired, over_size): which files go, oldest first, and why."""
    ordered = sorted(files, key=lambda item: (item.mtime, item.name))
    expired: list[OutputFile] = []
    rest: list[OutputFile] = []
    for item in ordered:
        age = now - item.mtime
        if policy.max_age_days > 0 and age > policy.max_age_days * DAY and age > RECENT_SECONDS:
            expired.append(item)
        else:
            rest.append(item)
    over_size: list[OutputFile] = []
    if policy.max_bytes > 0:
        total = sum(item.size for item in rest)
        for item in rest:  # oldest first
            if total <= policy.max_bytes or now - item.mtime < RECENT_SECONDS:
                break  # everything after this one is newer still
            over_size.append(item)
            total -= item.size
    return expired, over_size


def protected(remaining: list[OutputFile], policy: RetentionPolicy, now: float) -> list[OutputFile]:
    """Of the files a pass keeps, those the limits would delete but for being younger than
    RECENT_SECONDS (oldest first): what an operator asks about when a prune deleted less than expected."""
    total = sum(item.size for item in remaining)
    found: list[OutputFile] = []
    for item in sorted(remaining, key=lambda entry: (entry.mtime, entry.name)):
        age = now - item.mtime
        if age >= RECENT_SECONDS:
            continue
        too_old = policy.max_age_days > 0 and age > policy.max_age_days * DAY
        too_much = policy.max_bytes > 0 and total > policy.max_bytes
        if too_old or too_much:
            found.append(item)
            total -= item.size
    return found


def prune(root: Path, policy: RetentionPolicy, *, dry_run: bool = False, now: float | None = None) -> PruneReport:
    """Apply the policy to the outputs in `root` (nothing is deleted with dry_run)."""
    files = catalog.scan(root)
    now = time.time() if now is None else now
    expired, over_size = plan(files, policy, now)
    report = PruneReport(dry_run=dry_run)
    for reason, chosen, kept in (("age", expired, report.expired), ("size", over_size, report.over_size)):
        for item in chosen:
            if not dry_run:
                try:
                    catalog.delete(root, item.name)
                except NotFoundError:
                    continue  # gone already (a DELETE, another prune): nothing freed here
                except OSError as error:
                    log.warning("could not delete output %s (%s): %s", item.name, reason, error.strerror)
                    continue
            kept.append(item)
    removed = {item.name for item in report.removed}
    remaining = [item for item in files if item.name not in removed]
    report.kept_files = len(remaining)
    report.kept_bytes = sum(item.size for item in remaining)
    report.protected = protected(remaining, policy, now)
    return report


class RetentionTask:
    """Runs `prune` in a worker thread at start-up and every SD_OUTPUT_PRUNE_INTERVAL seconds."""

    def __init__(
        self,
        root: Path,
        policy: RetentionPolicy,
        interval: float,
        after_pass: Callable[[PruneReport], object] | None = None,
    ) -> None:
        self.root = root
        self.policy = policy
        self.interval = interval
        self._after_pass = after_pass
        self._task: asyncio.Task[None] | None = None
        self.passes = 0

    def start(self) -> None:
        if not self.policy.active:
            return
        log.info("retention: outputs %s are deleted, checked every %gs", self.policy.describe(), self.interval)
        self._task = asyncio.create_task(self._run(), name="output-retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def run_once(self) -> PruneReport:
        report = prune(self.root, self.policy)
        self.passes += 1
        if report.removed:
            log.info(
                "retention: deleted %d output(s), %.1f MB (%d older than %g day(s), %d beyond SD_OUTPUT_MAX_GB); "
                "%d kept, %.1f MB",
                len(report.removed),
                report.freed_bytes / 1e6,
                len(report.expired),
                self.policy.max_age_days,
                len(report.over_size),
                report.kept_files,
                report.kept_bytes / 1e6,
            )
        from imagegen import metrics

        metrics.record_outputs_deleted("age", len(report.expired), sum(item.size for item in report.expired))
        metrics.record_outputs_deleted("size", len(report.over_size), sum(item.size for item in report.over_size))
        if self._after_pass is not None:
            self._after_pass(report)
        return report

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.run_once)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retention pass failed; trying again in %gs", self.interval)
            await asyncio.sleep(self.interval)
