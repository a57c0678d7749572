"""Batching and cancellation on the real tiny SD pipeline: compatible queued jobs are merged into one
pipeline call, and each job's image equals the one it gets alone (within one level of rounding)."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable

import httpx
from PIL import Image

from tests.engine.test_jobs_api import submit, wait_status
from tests.support.fake_backend import FakeBackend


def pixels(job: dict) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(job["result"]["images"][0]["b64"]))).tobytes()


def test_queued_compatible_jobs_share_one_call_and_match_their_solo_images(
    serve: Callable[..., httpx.Client],
) -> None:
    holder: dict[str, FakeBackend] = {}

    def blocker_factory(settings):  # a fake on the device lane, to hold it while jobs queue
        holder["fake"] = FakeBackend(settings, lane="local")
        return holder["fake"]

    client = serve(factories={"fake": blocker_factory}, max_batch=4)
    blocker = submit(client, prompt="hang", backend="fake")
    wait_status(client, blocker["id"], {"running"})
    prompts = ["a red cube", "a blue sphere", "a green cone", "a red cube"]
    jobs = [submit(client, prompt=prompt, seed=100 + i, steps=3) for i, prompt in enumerate(prompts)]
    odd = submit(client, prompt="other size", width=32, height=32, steps=3)  # incompatible: runs apart
    holder["fake"].release()
    done = [wait_status(client, job["id"], {"succeeded"}) for job in jobs]
    odd_done = wait_status(client, odd["id"], {"succeeded"})
    assert [job["result"]["timings"]["batch_size"] for job in done] == [4, 4, 4, 4]
    assert odd_done["result"]["timings"]["batch_size"] == 1

    for index, job in enumerate(done):
        alone = client.post("/api/txt2img", json={"prompt": prompts[index], "seed": 100 + index, "steps": 3}).json()
        assert alone["timings"]["batch_size"] == 1
        solo = Image.open(io.BytesIO(base64.b64decode(alone["images"][0]["b64"]))).tobytes()
        batched = pixels(job)
        assert max(abs(a - b) for a, b in zip(solo, batched, strict=True)) <= 1
    # Same prompt, different seeds inside one batch: different images.
    assert pixels(done[0]) != pixels(done[3])


def test_cancelling_a_running_real_pipeline_stops_it_between_steps(serve: Callable[..., httpx.Client]) -> None:
    # The stop between steps, not the kill that follows SD_DEVICE_STOP_GRACE: on a loaded machine a
    # step of this size can take seconds.
    client = serve(device_stop_grace=60)
    job = submit(client, prompt="a very long render", steps=150, width=256, height=256)
    deadline = time.monotonic() + 30
    while client.get(f"/api/jobs/{job['id']}").json()["progress"]["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    cancelled = client.post(f"/api/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    started = time.monotonic()
    after = client.post("/api/txt2img", json={"prompt": "next", "steps": 2})
    assert after.status_code == 200
    # The lane was freed at the next step, not after the remaining ~148 steps.
    assert time.monotonic() - started < 10
    final = client.get(f"/api/jobs/{job['id']}").json()
    assert final["status"] == "cancelled" and final["result"] is None and final["progress"]["step"] < 150
    assert client.get("/health").json()["backends"]["sd"]["device_process"]["restarts"] == 0  # stopped, not killed
