"""The `openai` Python SDK against the live service: client.images.generate in b64 and url modes,
n > 1, model aliases, error mapping onto the SDK's exception classes, and the key as a Bearer token."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import openai
import pytest
from PIL import Image

from imagegen.storage.metadata import read_metadata
from tests.compat.conftest import KEY, Service
from tests.support.fake_backend import expected_pixels


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[openai.OpenAI]:
    # No retries: a test must see the first answer (the SDK retries 409/429/5xx by default).
    with openai.OpenAI(api_key=KEY, base_url=f"{service.url}/v1", max_retries=0, timeout=120) as sdk:
        yield sdk


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def meta(b64: str) -> dict:
    return read_metadata(io.BytesIO(base64.b64decode(b64)))["imagegen"]


def test_b64_is_the_default_and_carries_the_parameters(client: openai.OpenAI) -> None:
    result = client.images.generate(
        prompt="a red fox in the snow", model="sd", size="64x64", extra_body={"seed": 7, "steps": 3}
    )
    assert result.created > 0 and result.size == "64x64" and result.output_format == "png"
    (item,) = result.data
    assert item.url is None and not item.b64_json.startswith("data:")
    image = decode(item.b64_json)
    assert image.format == "PNG" and image.size == (64, 64)
    assert "Seed: 7" in image.info["parameters"]  # the A1111 text chunk travels with the file
    assert meta(item.b64_json)["backend"] == "sd" and meta(item.b64_json)["model"] == "tiny-sd"


def test_url_mode_points_at_the_service_and_needs_the_key(client: openai.OpenAI, service: Service) -> None:
    result = client.images.generate(
        prompt="a red fox", model="sd", size="64x64", response_format="url", extra_body={"steps": 2}
    )
    (item,) = result.data
    assert item.b64_json is None
    assert item.url.startswith(f"{service.url}/api/images/") and item.url.endswith(".png")
    fetched = httpx.get(item.url, headers={"Authorization": f"Bearer {KEY}"})  # what Open WebUI does
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (64, 64)
    assert httpx.get(item.url).status_code == 401


def test_n_images_with_consecutive_seeds(client: openai.OpenAI) -> None:
    result = client.images.generate(prompt="two foxes", n=2, size="64x64", extra_body={"seed": 40, "steps": 2})
    assert [meta(item.b64_json)["seed"] for item in result.data] == [40, 41]
    first, second = (decode(item.b64_json).tobytes() for item in result.data)
    assert first != second


@pytest.mark.parametrize("alias", ["dall-e-3", "dall-e-2", "gpt-image-1", "no-such-model"])
def test_unknown_and_openai_model_names_mean_the_default_backend(client: openai.OpenAI, alias: str) -> None:
    result = client.images.generate(prompt="a fox", model=alias, size="64x64", extra_body={"steps": 1})
    assert meta(result.data[0].b64_json)["backend"] == "sd"


def test_a_backend_id_selects_that_backend(client: openai.OpenAI) -> None:
    result = client.images.generate(prompt="a fox", model="fake", size="64x64", extra_body={"seed": 3})
    image = decode(result.data[0].b64_json).convert("RGB")
    assert image.tobytes() == expected_pixels("a fox", 3, 64, 64).tobytes()


def test_output_format_and_quality(client: openai.OpenAI) -> None:
    jpeg = client.images.generate(prompt="a fox", model="fake", size="64x64", output_format="jpeg")
    assert jpeg.output_format == "jpeg" and decode(jpeg.data[0].b64_json).format == "JPEG"
    # quality maps onto the model's default steps (the fake model's: 4): low halves them, hd adds half.
    low = client.images.generate(prompt="a fox", model="fake", size="64x64", quality="low")
    high = client.images.generate(prompt="a fox", model="fake", size="64x64", quality="hd")
    standard = client.images.generate(prompt="a fox", model="fake", size="64x64", quality="standard")
    assert [meta(result.data[0].b64_json)["steps"] for result in (low, high, standard)] == [2, 6, 4]


def test_models_list(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids[0] == "sd"  # the default backend first
    assert {"sd", "fake", "tiny-sd", "tiny-sdxl", "dall-e-2", "dall-e-3"} <= set(ids)
    assert "flux-api" not in ids  # no BFL key here: a backend that cannot take jobs is not offered
    assert client.models.retrieve("dall-e-3").owned_by == "imagegen"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_invalid_size_is_a_bad_request_naming_size(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a fox", model="sd", size="65x64")
    assert caught.value.param == "size" and caught.value.type == "invalid_request_error"
    assert "multiple of 8" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a fox", size="huge")
    assert caught.value.param == "size" and "WIDTHxHEIGHT" in caught.value.message


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 9}, "n"),
        ({"response_format": "gif"}, "response_format"),
        ({"output_format": "svg"}, "output_format"),
        ({"stream": False, "extra_body": {"stream": True}}, "stream"),
        ({"prompt": ""}, "prompt"),
    ],
)
def test_other_invalid_parameters(client: openai.OpenAI, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(**{"prompt": "a fox", "size": "64x64", **kwargs})
    assert caught.value.param == param
    body = caught.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}


def test_wrong_key_is_an_authentication_error(service: Service) -> None:
    with openai.OpenAI(api_key="wrong", base_url=f"{service.url}/v1", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk.images.generate(prompt="a fox")
    assert caught.value.code == "invalid_api_key"
    assert KEY not in str(caught.value.body)
