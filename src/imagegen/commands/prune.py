"""`imagegen prune`: apply the retention limits to SD_OUTPUT_DIR now (or see what would go), and say
what was deleted, what was kept and why (files younger than five minutes are never deleted)."""

from __future__ import annotations

import argparse
import sys
import time

#: What storage.retention.RECENT_SECONDS protects, in the words of `--help` (kept here so that --help
#: imports nothing).
RECENT_MINUTES = 5.0


def run(args: argparse.Namespace) -> int:
    from imagegen.config import SettingsError, load_settings
    from imagegen.storage.catalog import scan
    from imagegen.storage.retention import GB, RetentionPolicy, prune

    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"imagegen: {error}", file=sys.stderr)
        return 2
    days = settings.output_retention_days if args.days is None else args.days
    max_gb = settings.output_max_gb if args.max_gb is None else args.max_gb
    policy = RetentionPolicy(days, int(max_gb * GB))
    if not policy.active:
        print(
            "imagegen: nothing to prune: no limit set (pass --days / --max-gb, or set SD_OUTPUT_RETENTION_DAYS / "
            "SD_OUTPUT_MAX_GB)",
            file=sys.stderr,
        )
        return 0
    root = settings.output_dir
    if not root.is_dir():
        print(f"imagegen: {root} does not exist: nothing to prune", file=sys.stderr)
        return 0
    now = time.time()
    report = prune(root.resolve(), policy, dry_run=args.dry_run, now=now)
    verb = "would delete" if args.dry_run else "deleted"
    for reason, items in (("older than the age limit", report.expired), ("over the size limit", report.over_size)):
        for item in items:
            print(f"{verb} {item.name} ({item.size} bytes, {reason})")
    recent = {item.name for item in report.protected}
    for item in report.protected:
        age = max(0, round(now - item.mtime))
        print(
            f"kept {item.name} ({item.size} bytes, written {age} s ago: files younger than "
            f"{RECENT_MINUTES:g} minutes are never deleted)"
        )
    if args.verbose:
        listed = {item.name for item in report.removed} | recent
        for item in sorted(scan(root.resolve()), key=lambda entry: entry.name):
            if item.name not in listed:
                print(f"kept {item.name} ({item.size} bytes, within the limits)")
    within = report.kept_files - len(report.protected)
    print(
        f"{verb} {len(report.removed)} image(s), {report.freed_bytes / 1e6:.1f} MB, {policy.describe()} "
        f"from {root}; {report.kept_files} kept ({report.kept_bytes / 1e6:.1f} MB): {within} within the limits, "
        f"{len(report.protected)} younger than {RECENT_MINUTES:g} minutes",
        file=sys.stderr,
    )
    return 0
