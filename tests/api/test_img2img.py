"""The native image routes: POST /api/img2img (synchronous, the txt2img answer) and POST /api/jobs with
images, over real HTTP on the tiny SD pipeline; bad images are 4xx naming the field; image routes have
their own body limit; inputs are stored once by content hash (the job row stays small), kept while a job
needs them and pruned after."""

from __future__ import annotations

import asyncio
import base64
import io
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from tests.support.editing import b64, data_url, gradient, half_mask, png_bomb, png_bytes


def decoded(item: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64"])))


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_img2img_answers_like_txt2img(sd_client: httpx.Client) -> None:
    body = {"prompt": "the same, in winter", "images": [data_url(gradient(48, 40))], "seed": 3, "steps": 8}
    response = sd_client.post("/api/img2img", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    image = answer["images"][0]
    assert (image["width"], image["height"]) == (48, 40) == decoded(image).size  # the init image's size
    parameters = answer["parameters"]
    assert parameters["mode"] == "img2img" and parameters["strength"] == 0.75 and parameters["mask"] is None
    assert [item["width"] for item in parameters["images"]] == [48] and len(parameters["images"][0]["sha256"]) == 64
    again = sd_client.post("/api/img2img", json={**body, "images": [b64(gradient(48, 40))]}).json()
    assert decoded(again["images"][0]).tobytes() == decoded(image).tobytes()  # same pixels and seed, either form
    assert again["parameters"]["images"] == parameters["images"]  # stored once, by content
    job = sd_client.get(f"/api/jobs/{answer['id']}").json()
    assert job["progress"] == {"step": 6, "total": 6, "fraction": 1.0, "eta_seconds": None}  # int(8 x 0.75) steps ran


def test_inpainting_and_raw_answer(sd_client: httpx.Client) -> None:
    init, mask = b64(gradient(32, 32)), b64(half_mask(32, 32))
    response = sd_client.post(
        "/api/img2img",
        json={"prompt": "a door", "images": [init], "mask": mask, "strength": 0.5, "steps": 4, "seed": 1},
        headers={"Accept": "image/png"},
    )
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (32, 32)
    job = sd_client.get(f"/api/jobs/{response.headers['X-Job-Id']}").json()
    assert job["parameters"]["mode"] == "inpaint" and job["parameters"]["mask"]["width"] == 32


def test_jobs_take_images_and_keep_the_row_small(sd_client: httpx.Client) -> None:
    big = Image.effect_noise((128, 128), 60).convert("RGB")
    accepted = sd_client.post("/api/jobs", json={"prompt": "x", "images": [b64(big)], "steps": 4})
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    services = sd_client.app.state.services  # type: ignore[attr-defined]
    row = services.store._conn.execute("SELECT request FROM jobs WHERE id=?", (job_id,)).fetchone()[0]
    assert len(row) < 2000  # a content hash per image, not base64
    assert len(png_bytes(big)) > 20_000
    while sd_client.get(f"/api/jobs/{job_id}").json()["status"] in ("queued", "running"):
        pass
    assert sd_client.get(f"/api/jobs/{job_id}").json()["status"] == "succeeded"


def test_bad_images_are_4xx_naming_the_field(sd_client: httpx.Client) -> None:
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"images": ["R0lGODlhAQABAAAAACw="]}, "images[0]", "PNG, JPEG or WebP"),
        ({"images": ["https://169.254.169.254/latest/meta-data/x.png"]}, "images[0]", "never fetched"),
        ({"images": [b64(gradient(8, 8)), "%%%"]}, "images[1]", "base64"),
        ({"images": [base64.b64encode(png_bomb(8000, 5000)).decode()]}, "images[0]", "SD_MAX_INPUT_PIXELS"),
        ({"images": [b64(gradient(32, 32))], "mask": b64(half_mask(16, 16))}, "mask", "must be the size"),
        ({"images": [b64(gradient(32, 32))], "strength": 0.1, "steps": 5}, "strength", "denoising step"),
        ({"images": [b64(gradient(8, 8))] * 9}, "images", "SD_MAX_INPUT_IMAGES"),
        ({"images": [b64(gradient(8, 8))] * 2}, "images", "one init image"),
        ({"images": []}, "images", ""),
    ]
    for extra, param, words in cases:
        found = error(sd_client.post("/api/img2img", json={"prompt": "x", **extra}), 422)
        assert found["param"] == param and words in found["message"], (extra.keys(), found)
    # txt2img takes no images: a typo never silently does nothing.
    found = error(sd_client.post("/api/txt2img", json={"prompt": "x", "images": [b64(gradient(8, 8))]}), 422)
    assert found["param"] == "images"
    # A mask needs an image.
    found = error(sd_client.post("/api/jobs", json={"prompt": "x", "mask": b64(half_mask(8, 8))}), 422)
    assert found["param"] == "mask"


def test_image_routes_have_their_own_body_limit(serve: Callable[..., httpx.Client], fake_factory) -> None:
    factories, _ = fake_factory()
    client = serve(factories=factories, default_backend="fake", max_body_bytes=4096, max_upload_bytes=60_000)
    image = b64(Image.effect_noise((96, 96), 60).convert("RGB"))
    assert 4096 < len(image) < 50_000
    ok = client.post("/api/img2img", json={"prompt": "x", "images": [image], "steps": 4})
    assert ok.status_code == 200, ok.text
    assert ok.json()["images"][0]["conditioned_on"] == ok.json()["parameters"]["images"][0]["sha256"]
    too_big = error(client.post("/api/txt2img", json={"prompt": "x" * 5000}), 413)
    assert "SD_MAX_BODY_BYTES" in too_big["message"]
    huge = error(client.post("/api/img2img", json={"prompt": "x", "images": [image * 3]}), 413)
    assert "SD_MAX_UPLOAD_BYTES" in huge["message"]
    # Only /v1/images/edits takes multipart; the native routes keep JSON only.
    form = client.post("/api/img2img", files={"images": ("a.png", b"\x89PNG")}, data={"prompt": "x"})
    assert error(form, 415)["type"] == "unsupported_media_type"


def test_inputs_are_kept_while_a_job_needs_them_then_pruned(serve: Callable[..., httpx.Client], fake_factory) -> None:
    factories, holder = fake_factory()
    client = serve(factories=factories, default_backend="fake")
    services = client.app.state.services  # type: ignore[attr-defined]
    held = client.post("/api/jobs", json={"prompt": "hang", "images": [b64(gradient(16, 16))]}).json()["id"]
    queued = client.post("/api/jobs", json={"prompt": "x", "images": [b64(gradient(24, 24))]}).json()["id"]
    # The engine's answer reads its own memory only: a loop of this thread's own can ask it.
    in_use = asyncio.run(services.engine.inputs_in_use())
    assert len(in_use) == 2
    assert services.inputs.prune(in_use, grace=0) == []  # both jobs still need theirs
    holder["backend"].release()
    for job_id in (held, queued):
        while client.get(f"/api/jobs/{job_id}").json()["status"] in ("queued", "running"):
            pass
    assert asyncio.run(services.engine.inputs_in_use()) == set()
    assert sorted(services.inputs.prune(set(), grace=0)) == sorted(in_use)
    assert services.inputs.names() == []


def test_a_queued_edit_survives_a_restart(service, tmp_path: Path) -> None:
    first = service(FAKE_STEP_DELAY="0.05", SD_MAX_BATCH="1")
    client = first.start()
    client.post("/api/jobs", json={"prompt": "slow blocker", "steps": 100})  # keeps the lane busy
    edit = client.post("/api/jobs", json={"prompt": "x", "images": [b64(gradient(40, 24))], "strength": 0.5})
    assert edit.status_code == 202, edit.text
    edit_id = edit.json()["id"]
    first.kill()
    second = service(FAKE_STEP_DELAY="0.001", SD_MAX_BATCH="1")
    client = second.start()
    from tests.support.process import wait_until

    final = wait_until(client, edit_id, {"succeeded", "failed"})
    assert final["status"] == "succeeded", final
    assert final["parameters"]["mode"] == "img2img" and final["parameters"]["strength"] == 0.5
    assert final["result"]["images"][0]["conditioned_on"] == final["parameters"]["images"][0]["sha256"]
    assert (final["result"]["images"][0]["width"], final["result"]["images"][0]["height"]) == (40, 24)
    stored = sqlite3.connect(tmp_path / "data" / "jobs.sqlite3").execute("SELECT length(request) FROM jobs").fetchall()
    assert max(length for (length,) in stored) < 2000
