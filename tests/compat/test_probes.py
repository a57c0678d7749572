"""The A1111 and OpenAI routes clients probe beyond generation, with the real clients where they have a
call for it (webuiapi's png_info, refresh_checkpoints, get_memory...; the openai SDK's variations):
cheap real answers where the service can give them, else 501 in the dialect's own error shape."""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest
import webuiapi
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tests.compat.conftest import KEY, Service
from tests.compat.test_webuiapi import connect
from tests.support.scrape import delta, scrape


@pytest.fixture(scope="module")
def api(service: Service) -> webuiapi.WebUIApi:
    return connect(service)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_png_info_reads_what_the_service_embeds(service: Service, api: webuiapi.WebUIApi) -> None:
    made = service.http.post(
        "/api/txt2img",
        json={"prompt": "a red fox\nin the snow", "negative_prompt": "blurry", "seed": 42, "steps": 3},
    ).json()
    png = base64.b64decode(made["images"][0]["b64"])
    answer = service.http.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + _b64(png)}).json()
    # The prompt's line break is a space in the parameters text (a prompt cannot spoof a field line);
    # the exact prompt is in the imagegen chunk.
    assert answer["info"].startswith("a red fox in the snow\nNegative prompt: blurry\nSteps: 3")
    fields = answer["parameters"]
    assert fields["Prompt"] == "a red fox in the snow" and fields["Negative prompt"] == "blurry"
    assert json.loads(answer["items"]["imagegen"])["prompt"] == "a red fox\nin the snow"
    assert (fields["Seed"], fields["Steps"], fields["Model"]) == ("42", "3", "tiny-sd")
    assert (fields["Size-1"], fields["Size-2"]) == (64, 64)
    assert '"seed": 42' in answer["items"]["imagegen"]
    # The A1111 client: it re-encodes the image it is given, keeping its text chunks.
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        result = api.png_info(image)
    assert result.parameters["Seed"] == "42" and "Seed: 42" in result.info


def test_png_info_of_a_jpeg_and_of_an_a1111_png(service: Service) -> None:
    made = service.http.post("/api/txt2img", json={"prompt": "a jpeg fox", "seed": 5, "output_format": "jpeg"})
    jpeg = base64.b64decode(made.json()["images"][0]["b64"])
    answer = service.http.post("/sdapi/v1/png-info", json={"image": _b64(jpeg)}).json()
    assert answer["parameters"]["Prompt"] == "a jpeg fox" and answer["parameters"]["Seed"] == "5"

    text = (
        "masterpiece, a cat\nNegative prompt: ugly\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, "
        'CFG scale: 7, Seed: 123, Size: 512x768, Model: v1-5, Lora hashes: "a: 1, b: 2", Version: v1.10.1'
    )
    info = PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    answer = service.http.post("/sdapi/v1/png-info", json={"image": _b64(buffer.getvalue())}).json()
    assert answer["info"] == text and answer["items"] == {}
    fields = answer["parameters"]
    assert fields["Prompt"] == "masterpiece, a cat" and fields["Schedule type"] == "Karras"
    assert fields["Lora hashes"] == "a: 1, b: 2" and (fields["Size-1"], fields["Size-2"]) == (512, 768)

    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, format="PNG")
    empty = service.http.post("/sdapi/v1/png-info", json={"image": _b64(plain.getvalue())}).json()
    assert empty == {"info": "", "items": {}, "parameters": {}}


@pytest.mark.parametrize("image", ["not base64!", "", _b64(b"GIF89a not an image")])
def test_png_info_refuses_what_is_not_an_image(service: Service, image: str) -> None:
    response = service.http.post("/sdapi/v1/png-info", json={"image": image})
    assert response.status_code == 422
    error = response.json()
    assert error["param"] == "image" and error["detail"] == error["errors"]  # A1111's shape


def test_cheap_real_answers(service: Service, api: webuiapi.WebUIApi) -> None:
    assert api.refresh_checkpoints() is None
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    flags = api.get_cmd_flags()
    assert flags["api"] is True and flags["api_auth"] is True
    memory = api.get_memory()
    assert memory["ram"]["total"] >= memory["ram"]["used"] > 0
    assert "cuda" in memory  # torch on CPU here: the reason there is none
    # The checkpoints list is still the allowlist.
    titles = [model["title"] for model in api.get_sd_models()]
    assert titles[:2] == ["tiny-sd [sd]", "tiny-sdxl [sd]"]


@pytest.mark.parametrize("route", ["extra-single-image", "extra-batch-images", "interrogate"])
def test_features_not_offered_are_501_in_a1111_shape(service: Service, route: str) -> None:
    response = service.http.post(f"/sdapi/v1/{route}", json={"image": _b64(b"x"), "upscaling_resize": 2})
    assert response.status_code == 501
    body = response.json()
    assert body["error"] == "not_supported" and "does not offer" in body["detail"]
    # Without the key it is the 401 of every route.
    assert httpx.post(f"{service.url}/sdapi/v1/{route}", json={}).status_code == 401


def test_webuiapi_interrogate_gets_a_clear_answer(service: Service, api: webuiapi.WebUIApi) -> None:
    response = service.http.post("/sdapi/v1/interrogate", json={"image": "", "model": "clip"})
    assert response.status_code == 501 and "interrogation" in response.json()["detail"]


def test_openai_variations_is_501_and_not_retried(service: Service) -> None:
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key=KEY, max_retries=2)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    before = scrape(service.http)
    with pytest.raises(openai.APIStatusError) as raised:
        client.images.create_variation(image=("fox.png", buffer.getvalue(), "image/png"), n=1)
    after = scrape(service.http)
    assert raised.value.status_code == 501
    error = raised.value.body
    assert isinstance(error, dict)
    assert error["code"] == "unsupported" and "variations are not supported" in error["message"]
    # A multipart upload hears the 501, not "the body must be JSON"; and the SDK asks once.
    requests = delta(
        before, after, "imagegen_http_requests_total", route="/v1/images/variations", method="POST", status="501"
    )
    assert requests == 1
