"""`imagegen health`: ask a running service whether it is ready (exit 0) or not (1); 2 if unreachable.

Used by the Docker HEALTHCHECK too: it needs no curl in the image and starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import sys


def _local() -> tuple[int, str | None]:
    """SD_PORT and SD_API_KEY of this machine's (or container's) settings."""
    try:
        from imagegen.config import load_settings

        settings = load_settings()
    except Exception:  # noqa: BLE001 - an invalid unrelated setting must not break a probe
        return 7860, None
    return settings.port, settings.api_key.get_secret_value() if settings.api_key is not None else None


def default_url() -> str:
    """http://127.0.0.1:<SD_PORT>: the service on this machine (or in this container)."""
    return f"http://127.0.0.1:{_local()[0]}"


def run(args: argparse.Namespace) -> int:
    import httpx

    port, key = _local()
    url = (args.url or f"http://127.0.0.1:{port}").rstrip("/")
    # With the key, /health adds each backend's details and the version; without it, states and reasons.
    headers = {"X-API-Key": key} if key else {}
    try:
        response = httpx.get(url + "/health", timeout=args.timeout, headers=headers)
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
            version = f"imagegen {body['version']}, " if body.get("version") else ""
            print(
                f"{url}: {body.get('status')} (HTTP {response.status_code}), {version}"
                f"default backend {body.get('default_backend')}, queue {queue.get('queued')} waiting / "
                f"{queue.get('running')} running"
            )
            for backend_id, backend in body["backends"].items():
                print(f"  {backend_id:<11} {backend.get('state'):<15} {backend.get('reason')}")
    return 0 if response.status_code == 200 else 1
