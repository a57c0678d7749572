"""Helpers for the operations tests: outputs of chosen ages and sizes, Prometheus scrapes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

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


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: httpx.Client, **headers: str) -> Samples:
    """Every sample of /metrics, parsed with prometheus_client's own parser (so the text must be valid)."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)
