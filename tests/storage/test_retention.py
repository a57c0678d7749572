"""Retention: files of chosen ages and sizes; only the right ones go, oldest first; nothing outside
the output folder, no temporary file of a write in progress, no symlink (or what it points to)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from imagegen.storage import catalog
from imagegen.storage.retention import RECENT_SECONDS, RetentionPolicy, plan, prune
from tests.support.outputs import DAY, make_output, output_name


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "outputs"
    folder.mkdir()
    return folder


def names(items) -> list[str]:  # type: ignore[no-untyped-def]
    return [item.name for item in items]


def test_age_limit_deletes_only_older_files(root: Path) -> None:
    now = time.time()
    old = make_output(root, output_name(1), age=10 * DAY, now=now)
    older_than_limit = make_output(root, output_name(2, "jpg"), age=2.5 * DAY, now=now)
    young = make_output(root, output_name(3, "webp"), age=1.5 * DAY, now=now)
    fresh = make_output(root, output_name(4), age=10, now=now)
    report = prune(root, RetentionPolicy(max_age_days=2), now=now)
    assert sorted(names(report.expired)) == sorted([old.name, older_than_limit.name])
    assert report.over_size == []
    assert not old.exists() and not older_than_limit.exists()
    assert young.exists() and fresh.exists()
    assert report.kept_files == 2


def test_size_limit_deletes_oldest_first_until_it_fits(root: Path) -> None:
    now = time.time()
    files = [make_output(root, output_name(i), size=400, age=(10 - i) * 3600, now=now) for i in range(5)]
    # 2000 bytes, limit 1000: the three oldest go (2000 -> 1600 -> 1200 -> 800).
    report = prune(root, RetentionPolicy(max_bytes=1000), now=now)
    assert names(report.over_size) == [files[0].name, files[1].name, files[2].name]
    assert [path.exists() for path in files] == [False, False, False, True, True]
    assert report.kept_bytes == 800 and report.freed_bytes == 1200


def test_age_then_size(root: Path) -> None:
    now = time.time()
    expired = make_output(root, output_name(1), size=10, age=30 * DAY, now=now)
    big_old = make_output(root, output_name(2), size=900, age=5 * DAY, now=now)
    small_new = make_output(root, output_name(3), size=300, age=1 * DAY, now=now)
    expired_plan, over_plan = plan(catalog.scan(root), RetentionPolicy(max_age_days=7, max_bytes=500), now)
    assert names(expired_plan) == [expired.name]
    assert names(over_plan) == [big_old.name]
    assert small_new.name not in names(expired_plan + over_plan)


def test_recent_files_are_never_deleted_even_over_the_limit(root: Path) -> None:
    now = time.time()
    just_written = make_output(root, output_name(1), size=5000, age=RECENT_SECONDS / 10, now=now)
    report = prune(root, RetentionPolicy(max_age_days=0.0001, max_bytes=10), now=now)
    assert report.removed == [] and just_written.exists()


def test_dry_run_deletes_nothing(root: Path) -> None:
    old = make_output(root, output_name(1), age=10 * DAY)
    report = prune(root, RetentionPolicy(max_age_days=1), dry_run=True)
    assert names(report.expired) == [old.name] and report.dry_run
    assert old.exists()


def test_only_stored_outputs_are_candidates(root: Path, tmp_path: Path) -> None:
    now = time.time()
    ancient = 365 * DAY
    # A write in progress: OutputStore writes ".tmp-*" and renames it when complete.
    in_progress = make_output(root, ".tmp-abc123", age=ancient, now=now)
    foreign = make_output(root, "notes.txt", age=ancient, now=now)
    bad_name = make_output(root, "20260101-000000-ABCDEF012345.png", age=ancient, now=now)
    folder = root / output_name(7)
    folder.mkdir()
    os.utime(folder, (now - ancient, now - ancient))
    outside = make_output(tmp_path, output_name(8), age=ancient, now=now)  # same name pattern, wrong folder
    expired = make_output(root, output_name(9), age=ancient, now=now)
    report = prune(root, RetentionPolicy(max_age_days=1, max_bytes=1), now=now)
    assert names(report.removed) == [expired.name]
    for path in (in_progress, foreign, bad_name, folder, outside):
        assert path.exists(), path


def test_symlinks_are_never_followed_nor_deleted(root: Path, tmp_path: Path) -> None:
    now = time.time()
    secret = make_output(tmp_path, "secret.png", size=5000, age=400 * DAY, now=now)
    link_out = root / output_name(1)
    os.symlink(secret, link_out)
    inside_target = make_output(root, output_name(2), size=100, age=1 * DAY, now=now)  # young: stays
    link_in = root / output_name(3)
    os.symlink(inside_target, link_in)
    os.utime(link_out, (now - 400 * DAY,) * 2, follow_symlinks=False)
    os.utime(link_in, (now - 400 * DAY,) * 2, follow_symlinks=False)
    assert names(catalog.scan(root)) == [inside_target.name]
    report = prune(root, RetentionPolicy(max_age_days=30, max_bytes=1000), now=now)
    assert report.removed == []
    assert secret.exists() and inside_target.exists()
    assert link_out.is_symlink() and link_in.is_symlink()


def test_file_deleted_meanwhile_is_skipped(root: Path) -> None:
    now = time.time()
    first = make_output(root, output_name(1), age=10 * DAY, now=now)
    second = make_output(root, output_name(2), age=10 * DAY, now=now)
    expired, _ = plan(catalog.scan(root), RetentionPolicy(max_age_days=1), now)
    first.unlink()  # a DELETE or another prune got there first
    report = prune(root, RetentionPolicy(max_age_days=1), now=now)
    assert names(report.expired) == [second.name] and len(expired) == 2
