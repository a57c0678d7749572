"""Live previews through the engine and every surface that shows them, with the fake backend (which
sends previews through the run context as the local backends do): the job's event stream with
`?previews=true` (opt-in: nobody else pays for the bytes), GET /api/jobs/{id}/preview, A1111's
`/sdapi/v1/progress` `current_image`, and the ETA from the measured step rate."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.engine.test_jobs_api import submit, wait_status
from tests.support.sse import read_events


@pytest.fixture
def start(serve: Callable[..., httpx.Client], fake_factory: Callable[..., Any]) -> Callable[..., httpx.Client]:
    def make(**settings: Any) -> httpx.Client:
        factories, _ = fake_factory(step_delay=0.01)  # "slow" prompts: 0.1 s a step
        return serve(factories=factories, default_backend="fake", **settings)

    return make


def _jpeg(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_previews_on_the_event_stream_are_opt_in(start: Callable[..., httpx.Client]) -> None:
    client = start(preview_interval=0.25)
    job = submit(client, prompt="a slow fox", steps=20, width=128, height=64)
    plain: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: plain.extend(read_events(client, f"/api/jobs/{job['id']}/events")))
    reader.start()
    events = list(read_events(client, f"/api/jobs/{job['id']}/events?previews=true"))
    reader.join(30)

    assert events[-1]["event"] == "succeeded"
    previews = [event["data"] for event in events if event["event"] == "preview"]
    assert 3 <= len(previews) <= 12, len(previews)  # about one per 0.25 s of a 2 s run, never per step
    steps = [preview["step"] for preview in previews]
    assert steps == sorted(set(steps)) and steps[-1] < 20  # the last step is the image itself
    for preview in previews:
        assert preview["total"] == 20 and preview["mime_type"] == "image/jpeg"
        image = _jpeg(preview["b64"])
        assert image.format == "JPEG" and image.size == (16, 8)  # the fake's previews: an eighth of the size
        assert abs(image.getpixel((0, 0))[0] - min(255, preview["step"] * 16)) <= 12  # this step's picture
    # Without ?previews=true the same stream carries none.
    assert plain[-1]["event"] == "succeeded"
    assert [event for event in plain if event["event"] == "preview"] == []
    assert any(event["event"] == "progress" for event in plain)


def test_progress_has_an_eta_from_the_measured_step_rate(start: Callable[..., httpx.Client]) -> None:
    client = start()
    job = submit(client, prompt="a slow fox", steps=20)
    etas = [
        (event["data"]["step"], event["data"]["eta_seconds"])
        for event in read_events(client, f"/api/jobs/{job['id']}/events")
        if event["event"] == "progress"
    ]
    assert etas[0][1] is None  # one step tells no rate
    measured = [(step, eta) for step, eta in etas[1:] if eta is not None]
    assert len(measured) >= 15
    for step, eta in measured:
        # 0.1 s a step (the fake's "slow"), on a shared machine: the right size, shrinking to zero.
        assert 0.05 * (20 - step) <= eta <= 0.5 * (20 - step) + 0.2, (step, eta)
    assert measured[-1][1] == 0.0
    done = client.get(f"/api/jobs/{job['id']}").json()
    assert done["progress"]["eta_seconds"] is None  # not running any more


def test_the_latest_preview_by_url_and_in_a1111_progress(start: Callable[..., httpx.Client]) -> None:
    client = start(preview_interval=0.1)
    job = submit(client, prompt="a slow castle", steps=40, width=64, height=64)
    wait_status(client, job["id"], {"running"})
    deadline = time.monotonic() + 10
    while (latest := client.get(f"/api/jobs/{job['id']}/preview")).status_code != 200:
        assert latest.status_code == 404 and time.monotonic() < deadline
        time.sleep(0.05)
    assert latest.headers["content-type"] == "image/jpeg" and latest.headers["cache-control"] == "no-store"
    assert 1 <= int(latest.headers["x-step"]) < 40 and latest.headers["x-total-steps"] == "40"
    assert Image.open(io.BytesIO(latest.content)).size == (8, 8)

    progress = client.get("/sdapi/v1/progress").json()
    assert progress["state"]["job"] == job["id"] and 0 < progress["progress"] < 1
    assert _jpeg(progress["current_image"]).format == "JPEG"
    assert progress["eta_relative"] > 0
    assert client.get("/sdapi/v1/progress", params={"skip_current_image": "true"}).json()["current_image"] is None

    client.post(f"/api/jobs/{job['id']}/cancel")
    assert client.get(f"/api/jobs/{job['id']}/preview").status_code == 404  # a preview is of a running job
    assert client.get("/sdapi/v1/progress").json()["current_image"] is None


def test_no_previews_when_turned_off(start: Callable[..., httpx.Client]) -> None:
    client = start(preview_interval=0)
    job = submit(client, prompt="a slow fox", steps=10)
    events = list(read_events(client, f"/api/jobs/{job['id']}/events?previews=true"))
    assert events[-1]["event"] == "succeeded"
    assert [event for event in events if event["event"] == "preview"] == []
