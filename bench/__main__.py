"""Run every benchmark module (bench/bench_*.py) and print one table; also write JSON.

Each module exposes `run() -> list[dict]` with keys: metric, value, unit, target (text), met (bool or
None when there is no target), detail (how it was measured). Run a subset with
`python -m bench engine flux_api` (module names without the bench_ prefix).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def _modules(selected: list[str]) -> list[str]:
    names = sorted(info.name for info in pkgutil.iter_modules([str(HERE)]) if info.name.startswith("bench_"))
    if selected:
        names = [name for name in names if name.removeprefix("bench_") in selected]
    return names


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str]) -> int:
    rows: list[dict] = []
    for name in _modules(argv):
        module = importlib.import_module(f"bench.{name}")
        started = time.perf_counter()
        print(f"# running {name} ...", file=sys.stderr, flush=True)
        for row in module.run():
            rows.append({"bench": name.removeprefix("bench_"), **row})
        print(f"# {name} took {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)

    headers = ("bench", "metric", "value", "target", "met")
    table = [
        (
            row["bench"],
            row["metric"],
            f"{row['value']:.3f} {row.get('unit', '')}".strip(),
            row.get("target") or "-",
            {True: "yes", False: "NO", None: "-"}[row.get("met")],
        )
        for row in rows
    ]
    widths = [max(len(str(item[i])) for item in [headers, *table]) for i in range(len(headers))]
    line = "  ".join(f"{{:<{width}}}" for width in widths)
    print(line.format(*headers))
    print(line.format(*("-" * width for width in widths)))
    for item in table:
        print(line.format(*item))
    for row in rows:
        if row.get("detail"):
            print(f"  [{row['bench']}/{row['metric']}] {row['detail']}")

    out = HERE / "results"
    out.mkdir(exist_ok=True)
    report = {
        "commit": _commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "python": platform.python_version(),
            "cpu_count": __import__("os").cpu_count(),
            "platform": platform.platform(),
        },
        "results": rows,
    }
    (out / "latest.json").write_text(json.dumps(report, indent=2))
    print(f"\nresults written to {out / 'latest.json'}")
    return 0 if all(row.get("met") is not False for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
