"""`imagegen health`: ask a running service whether it is ready (exit 0) or not (1); 2 if unreachable.

Used by the Docker HEALTHCHECK too: it needs no curl in the image and starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import sys


def default_url() -> str:
    """http://127.0.0.1:<SD_PORT>: the service on this machine (or in this container)."""
    try:
        from imagegen.config import load_settings

        port = load_settings().port
    except Exception:  # noqa: BLE001 - an invalid unrelated setting must not break a probe
        port = 7860
    return f"http://127.0.0.1:{port}"


def run(args: argparse.Namespace) -> int:
    import httpx

    url = (args.url or default_url()).rstrip("/")
    try:
        response = httpx.get(url + "/health", timeout=args.timeout)
    except httpx.HTTPError as error:
        if not args.quiet:
            print(
                f"imagegen: could not reach {url}: {type(error).__name__} (is the service running on that port?)",
                file=sys.stderr,
            )
        return 2
    try:
        body = response.json()
    except ValueError:
        body = None
    if args.json:
        print(json.dumps(body, indent=2))
    elif not args.quiet:
        if not isinstance(body, dict) or "backends" not in body:
            print(f"{url}: HTTP {response.status_code} (not an imagegen /health answer)")
        else:
            queue = body.get("queue", {})
            print(
                f"{url}: {body.get('status')} (HTTP {response.status_code}), imagegen {body.get('version')}, "
                f"default backend {body.get('default_backend')}, queue {queue.get('queued')} waiting / "
                f"{queue.get('running')} running"
            )
            for backend_id, backend in body["backends"].items():
                print(f"  {backend_id:<11} {backend.get('state'):<15} {backend.get('reason')}")
    return 0 if response.status_code == 200 else 1
