"""POST /v1/images/edits: the real `openai` SDK's client.images.edit (one image on sd, several references
on flux-local's FLUX.2 [klein], with a mask), replays of what Open WebUI and n8n send (files named
`<uuid>.png` whatever they hold: the bytes are sniffed), OpenAI-shaped errors, and the Origin check that
keeps a cross-site HTML form from posting."""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.compat.conftest import KEY, Service, start_service
from tests.support.editing import gradient, png_bytes


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Service]:
    yield from start_service(tmp_path_factory.mktemp("edits"), model_dir, flux_model_id="tiny-flux2-klein")


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(api_key=KEY, base_url=f"{service.url}/v1", max_retries=0, timeout=120) as sdk:
        yield sdk


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def openai_mask(width: int, height: int) -> bytes:
    """OpenAI's convention: opaque = keep, transparent (alpha 0) = edit. Right half transparent."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (width // 2, 0, width, height))
    return png_bytes(mask)


def job_of(service: Service, answer_size: str) -> dict:
    jobs = service.http.get("/api/jobs", params={"limit": 1}).json()["jobs"]
    assert jobs[0]["parameters"]["width"] == int(answer_size.split("x")[0])
    return jobs[0]


def test_sdk_edit_with_one_image(client: openai.OpenAI, service: Service) -> None:
    result = client.images.edit(
        image=("photo.png", png_bytes(gradient(48, 32)), "image/png"),
        prompt="the same, in winter",
        model="sd",
        extra_body={"seed": 4, "steps": 4},
    )
    assert result.size == "48x32" and decode(result.data[0].b64_json).size == (48, 32)
    job = job_of(service, result.size)
    assert job["parameters"]["mode"] == "img2img" and job["parameters"]["strength"] == 0.75


def test_sdk_edit_with_a_mask_inpaints(client: openai.OpenAI, service: Service) -> None:
    result = client.images.edit(
        image=("photo.png", png_bytes(gradient(32, 32)), "image/png"),
        mask=("mask.png", openai_mask(32, 32), "image/png"),
        prompt="a window",
        model="sd",
        n=2,
        size="32x32",
        extra_body={"seed": 1, "steps": 4},
    )
    assert len(result.data) == 2
    job = job_of(service, result.size)
    assert job["parameters"]["mode"] == "inpaint" and job["parameters"]["mask"]["width"] == 32
    # The stored mask is white where the upload was transparent (the area to edit).
    from imagegen.generation import InputImage

    stored = service.app.state.services.inputs.open(InputImage(**job["parameters"]["mask"]))  # type: ignore[attr-defined]
    assert stored.getpixel((28, 4)) == 255 and stored.getpixel((4, 4)) == 0


def test_sdk_edit_with_several_references_on_klein(client: openai.OpenAI, service: Service) -> None:
    images = [(f"ref{index}.png", png_bytes(gradient(64 + 16 * index, 64)), "image/png") for index in range(3)]
    result = client.images.edit(image=images, prompt="these three, together", model="flux-local")
    assert result.size == "64x64"
    job = job_of(service, result.size)
    assert job["parameters"]["mode"] == "edit" and [item["width"] for item in job["parameters"]["images"]] == [
        64,
        80,
        96,
    ]


def test_open_webui_replay_names_every_file_png(service: Service) -> None:
    """Open WebUI posts each image as `<uuid>.png` (whatever it holds) under image / image[]."""
    jpeg = png_bytes(gradient(48, 32), "JPEG", quality=90)
    response = httpx.post(
        f"{service.url}/v1/images/edits",
        headers={"Authorization": f"Bearer {KEY}"},
        files=[("image", (f"{uuid.uuid4()}.png", jpeg, "image/png"))],
        data={"model": "sd", "prompt": "make it night", "n": "1", "size": "48x32"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert decode(response.json()["data"][0]["b64_json"]).size == (48, 32)


def test_n8n_replay_reports_what_it_ignores(service: Service) -> None:
    """n8n's OpenAI node (gpt-image-1 options): background, input_fidelity, quality, output_compression."""
    response = httpx.post(
        f"{service.url}/v1/images/edits",
        headers={"Authorization": f"Bearer {KEY}"},
        files={"image": ("data", png_bytes(gradient(32, 32)), "application/octet-stream")},
        data={
            "model": "gpt-image-1",
            "prompt": "add a hat",
            "n": "1",
            "size": "auto",
            "quality": "low",
            "background": "auto",
            "input_fidelity": "low",
            "output_compression": "100",
            "output_format": "png",
            "user": "n8n",
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == "32x32" and body["data"][0]["b64_json"]
    assert {"background", "input_fidelity", "output_compression", "user"} <= set(body["ignored_parameters"])


def test_edit_errors_in_openai_shape(client: openai.OpenAI, service: Service) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("a.gif", b"GIF89a....", "image/gif"), prompt="x", model="sd")
    assert caught.value.body["param"] == "image[0]" and "PNG, JPEG or WebP" in caught.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(
            image=("a.png", png_bytes(gradient(32, 32)), "image/png"),
            mask=("m.png", png_bytes(gradient(32, 32)), "image/png"),  # no alpha: which part to edit?
            prompt="x",
            model="sd",
        )
    assert caught.value.body["param"] == "mask" and "alpha" in caught.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=[("a.png", png_bytes(gradient(16, 16)), "image/png")] * 9, prompt="x", model="sd")
    missing = httpx.post(
        f"{service.url}/v1/images/edits", headers={"Authorization": f"Bearer {KEY}"}, files={"prompt": (None, "x")}
    )
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "image"


def test_a_cross_site_form_cannot_post_an_edit(service: Service) -> None:
    """Threat: a page on another site posting a multipart form with the browser's cached Basic credentials."""
    files = {"image": ("a.png", png_bytes(gradient(16, 16)), "image/png")}
    basic = {"Authorization": "Basic " + base64.b64encode(f"u:{KEY}".encode()).decode()}
    for origin in ("https://evil.example", "null"):
        refused = httpx.post(
            f"{service.url}/v1/images/edits", headers={**basic, "Origin": origin}, files=files, data={"prompt": "x"}
        )
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    own = service.url
    allowed = httpx.post(
        f"{service.url}/v1/images/edits",
        headers={**basic, "Origin": own},
        files=files,
        data={"prompt": "x", "model": "sd"},
        timeout=120,
    )
    assert allowed.status_code == 200, allowed.text
    # Every other route still takes JSON only.
    form = httpx.post(f"{service.url}/v1/images/generations", headers=basic, files=files, data={"prompt": "x"})
    assert form.status_code == 415
