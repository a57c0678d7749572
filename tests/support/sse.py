"""A small Server-Sent Events reader for tests (what a browser's EventSource does)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx


def read_events(client: httpx.Client, path: str, limit: int = 10_000) -> Iterator[dict[str, Any]]:
    with client.stream("GET", path, headers={"Accept": "text/event-stream"}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        event: dict[str, Any] = {}
        for line in response.iter_lines():
            if line == "":
                if "data" in event or "event" in event:
                    if "data" in event:
                        event["data"] = json.loads(event["data"])
                    yield event
                    limit -= 1
                    if limit <= 0:
                        return
                event = {}
            elif line.startswith(":"):
                continue
            else:
                field, _, value = line.partition(":")
                event[field] = value[1:] if value.startswith(" ") else value
