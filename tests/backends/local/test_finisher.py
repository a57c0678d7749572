"""The device never waits for the CPU (issue 16): the device thread's part of a batch ends with the
pixels on their way to the host, the finisher thread makes the images, and the engine's lane hands the
device the next batch meanwhile, with at most one batch finishing at a time."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from imagegen.backends.base import RunContext
from imagegen.backends.conditioning import Conditioning
from imagegen.backends.local.base import LoadedPipeline
from imagegen.backends.local.finisher import HostImages
from imagegen.backends.local.sd import StableDiffusionBackend
from imagegen.config import Settings
from imagegen.generation import GeneratedImage, GenerationParams, GenerationRequest
from tests.support.fake_local import SLOW_FINISH_SECONDS, FakeLocalBackend, pixel_value

FINISH_SECONDS = 0.6


class SlowFinishBackend(FakeLocalBackend):
    """The fake local backend (the real base class, device thread, finisher and engine) whose finishing
    is slow; it records when each batch's pipeline call and finishing begin and end."""

    events: list[tuple[str, str, float]] = []
    lock = threading.Lock()

    def _record(self, what: str, batch: Sequence[GenerationRequest]) -> None:
        with self.lock:
            self.events.append((what, batch[0].prompt, time.monotonic()))

    def run_pipeline(
        self, loaded: LoadedPipeline, batch: Sequence[GenerationRequest], ctx: RunContext, inputs: Conditioning
    ) -> Any:
        self._record("pipeline-start", batch)
        try:
            return super().run_pipeline(loaded, batch, ctx, inputs)
        finally:
            self._record("pipeline-end", batch)

    def _finish(
        self, batch: list[GenerationRequest], host: HostImages, info: dict[str, Any]
    ) -> list[list[GeneratedImage]]:
        self._record("finish-start", batch)
        time.sleep(FINISH_SECONDS)
        try:
            return super()._finish(batch, host, info)
        finally:
            self._record("finish-end", batch)


def test_next_batch_denoises_while_the_previous_one_finishes(serve: Callable[..., httpx.Client]) -> None:
    SlowFinishBackend.events.clear()
    client = serve(
        factories={"fake-local": SlowFinishBackend},
        default_backend="fake-local",
        device_isolation="thread",
        max_batch=1,
    )
    prompts = [f"job {index}" for index in range(4)]
    ids = []
    for index, prompt in enumerate(prompts):
        response = client.post("/api/jobs", json={"prompt": prompt, "seed": 10 + index, "steps": 4})
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    seen_finishing = False
    deadline = time.monotonic() + 60
    bodies: dict[str, Any] = {}
    while len(bodies) < len(ids):
        assert time.monotonic() < deadline, bodies
        batches = client.get("/health").json()["queue"]["lanes"]["local"]["batches"]
        seen_finishing |= any(batch["state"] == "finishing" for batch in batches)
        for job_id in ids:
            body = client.get(f"/api/jobs/{job_id}").json()
            if body["status"] in ("succeeded", "failed", "cancelled"):
                bodies[job_id] = body
        time.sleep(0.05)
    for index, job_id in enumerate(ids):
        body = bodies[job_id]
        assert body["status"] == "succeeded", body
        image = Image.open(io.BytesIO(base64.b64decode(body["result"]["images"][0]["b64"]))).convert("RGB")
        assert image.getpixel((0, 0))[0] == round(pixel_value(10 + index) * 255)
    assert seen_finishing  # /health showed a batch finishing off the device
    at = {(what, prompt): when for what, prompt, when in SlowFinishBackend.events}
    for first, second in itertools.pairwise(prompts):
        # The next batch's pipeline started before the previous batch's finishing ended...
        assert at[("pipeline-start", second)] < at[("finish-end", first)]
        # ...but never two batches finishing at once.
        assert at[("finish-start", second)] >= at[("finish-end", first)]
    for first, third in zip(prompts, prompts[2:], strict=False):
        # Bounded: a batch's finishing ends before the lane releases the device to the batch after next.
        assert at[("pipeline-start", third)] >= at[("finish-end", first)]


def test_finished_images_equal_the_numpy_path(make_settings: Callable[..., Settings], monkeypatch: Any) -> None:
    """Same seed, same pixels: the tensors decoded and converted on the device equal diffusers' numpy
    output converted on the host the way the service did before (round, clip, uint8)."""
    settings = make_settings(device_isolation="thread", safety_checker=False)
    backend = StableDiffusionBackend(settings)
    request = backend.resolve(GenerationParams(prompt="a castle", seed=8, steps=3, num_images=2))

    def generate() -> list[bytes]:
        results = asyncio.run(backend.generate([request], RunContext(["job"])))
        return [image.image.tobytes() for image in results[0] if image.image is not None]

    on_device = generate()
    pipe_class = type(backend.ensure_loaded().pipe)
    call = pipe_class.__call__

    def numpy_output(self: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["output_type"] = "np"
        return call(self, *args, **kwargs)

    monkeypatch.setattr(pipe_class, "__call__", numpy_output)
    on_host = generate()
    assert len(on_device) == 2 and on_device == on_host
    assert on_device[0] != on_device[1]  # two seeds, two images


def test_black_image_is_refused_from_a_host_array() -> None:
    from imagegen.backends.local.finisher import to_host
    from imagegen.errors import GenerationFailedError

    host = to_host(np.zeros((1, 8, 8, 3), dtype=np.float32), None)
    with pytest.raises(GenerationFailedError, match="all-black"):
        host.wait()
    with pytest.raises(GenerationFailedError, match="NaN"):
        to_host(np.full((1, 8, 8, 3), np.nan, dtype=np.float32), None)


def test_black_and_nan_are_refused_on_the_device() -> None:
    torch = pytest.importorskip("torch")
    from imagegen.backends.local.finisher import to_host
    from imagegen.errors import GenerationFailedError

    with pytest.raises(GenerationFailedError, match="all-black"):
        to_host(torch.zeros((2, 3, 8, 8)), None)
    with pytest.raises(GenerationFailedError, match="NaN"):
        to_host(torch.full((1, 3, 8, 8), float("nan")), None)
    pixels = to_host(torch.full((1, 3, 4, 4), 0.5), None).wait()
    assert pixels.shape == (1, 4, 4, 3) and pixels.dtype == np.uint8 and int(pixels[0, 0, 0, 0]) == 128


def test_the_device_process_releases_the_device_before_the_images_are_finished(
    serve: Callable[..., httpx.Client],
) -> None:
    """SD_DEVICE_ISOLATION=process (the default): the device process reports the device released
    (BatchReleased) and runs the next batch while the previous one finishes there."""
    client = serve(factories={"fake-local": FakeLocalBackend}, default_backend="fake-local", max_batch=1)
    ids = []
    for index in range(3):
        response = client.post("/api/jobs", json={"prompt": f"slowfinish {index}", "seed": 20 + index, "steps": 4})
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    deadline = time.monotonic() + 60
    bodies: dict[str, Any] = {}
    while len(bodies) < len(ids):
        assert time.monotonic() < deadline, bodies
        for job_id in ids:
            body = client.get(f"/api/jobs/{job_id}").json()
            if body["status"] in ("succeeded", "failed", "cancelled"):
                bodies[job_id] = body
        time.sleep(0.05)
    jobs = [bodies[job_id] for job_id in ids]
    for index, body in enumerate(jobs):
        assert body["status"] == "succeeded", body
        image = Image.open(io.BytesIO(base64.b64decode(body["result"]["images"][0]["b64"]))).convert("RGB")
        assert image.getpixel((0, 0))[0] == round(pixel_value(20 + index) * 255)

    def at(body: dict[str, Any], key: str) -> float:
        return datetime.fromisoformat(body[key]).timestamp()

    for first, second in itertools.pairwise(jobs):
        # The next batch had the device well before the previous one's images were finished.
        assert at(second, "started_at") < at(first, "finished_at") - SLOW_FINISH_SECONDS / 2


def wait_final(client: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        body: dict[str, Any] = client.get(f"/api/jobs/{job_id}").json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.02)


def test_the_finishing_counts_to_the_deadline_and_can_be_cancelled(serve: Callable[..., httpx.Client]) -> None:
    """The job's deadline and cancel hold until its images are finished, not only until the device
    is released; the lane runs on afterwards."""
    SlowFinishBackend.events.clear()
    client = serve(
        factories={"fake-local": SlowFinishBackend},
        default_backend="fake-local",
        device_isolation="thread",
        max_batch=1,
        job_timeout=FINISH_SECONDS / 2,
    )
    late = client.post("/api/jobs", json={"prompt": "late", "seed": 1, "steps": 2}).json()["id"]
    body = wait_final(client, late)
    assert body["status"] == "failed" and "SD_JOB_TIMEOUT" in body["error"]["message"], body
    assert any(what == "finish-start" and prompt == "late" for what, prompt, _ in SlowFinishBackend.events)


def test_a_cancel_while_the_images_finish_ends_the_job(serve: Callable[..., httpx.Client]) -> None:
    SlowFinishBackend.events.clear()
    client = serve(factories={"fake-local": SlowFinishBackend}, default_backend="fake-local", device_isolation="thread")
    job_id = client.post("/api/jobs", json={"prompt": "cancel me", "seed": 1, "steps": 2}).json()["id"]
    deadline = time.monotonic() + 30
    while not any(what == "finish-start" for what, _, _ in SlowFinishBackend.events):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 200
    assert wait_final(client, job_id)["status"] == "cancelled"
    after = client.post("/api/jobs", json={"prompt": "after", "seed": 3, "steps": 2}).json()["id"]
    assert wait_final(client, after)["status"] == "succeeded"


def test_a_cancel_while_the_device_process_finishes_kills_nothing(serve: Callable[..., httpx.Client]) -> None:
    """A cancel while a released batch's images are finished in the device process (for longer than
    SD_DEVICE_STOP_GRACE) answers the job at once and never kills the process: the device is free."""
    client = serve(
        factories={"fake-local": FakeLocalBackend},
        default_backend="fake-local",
        device_stop_grace=SLOW_FINISH_SECONDS / 4,
    )
    job_id = client.post("/api/jobs", json={"prompt": "slowfinish", "seed": 1, "steps": 2}).json()["id"]
    deadline = time.monotonic() + 30
    while client.get(f"/api/jobs/{job_id}").json()["progress"]["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(SLOW_FINISH_SECONDS / 4)  # released by now; its images are being finished
    assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 200
    assert wait_final(client, job_id)["status"] == "cancelled"
    after = client.post("/api/jobs", json={"prompt": "after", "seed": 3, "steps": 2}).json()["id"]
    assert wait_final(client, after)["status"] == "succeeded"
    process = client.get("/health").json()["backends"]["fake-local"]["device_process"]
    assert process["restarts"] == 0, process
