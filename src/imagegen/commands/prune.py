"""`imagegen prune`: apply the retention limits to SD_OUTPUT_DIR now (or see what would go)."""

from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> int:
    from imagegen.config import SettingsError, load_settings
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
    report = prune(root.resolve(), policy, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for reason, items in (("older than the age limit", report.expired), ("over the size limit", report.over_size)):
        for item in items:
            print(f"{verb} {item.name} ({item.size} bytes, {reason})")
    print(
        f"{verb} {len(report.removed)} image(s), {report.freed_bytes / 1e6:.1f} MB, {policy.describe()} "
        f"from {root}; {report.kept_files} kept ({report.kept_bytes / 1e6:.1f} MB)",
        file=sys.stderr,
    )
    return 0
