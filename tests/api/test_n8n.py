"""What n8n's HTTP Request node sends and expects, over real HTTP.

Filled field by field, the node sends numbers as strings (`"steps": "2"`): the native routes take
numeric strings for numeric fields, and nothing looser (booleans, lists, "2.5" for an integer, "nan").
With "Response Format: File" it asks for an image (`Accept: image/*`); a second image cannot travel
in a raw answer, so several images are a 406, not a silently dropped image.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.support.fake_backend import seed_of


@pytest.fixture
def client(serve: Callable[..., httpx.Client], fake_factory: Callable[..., Any]) -> httpx.Client:
    factories, _ = fake_factory()
    return serve(factories=factories, default_backend="fake")


def test_numeric_strings_are_numbers_on_the_native_routes(client: httpx.Client) -> None:
    body = {
        "prompt": "a fox from n8n",
        "steps": "3",
        "seed": "42",
        "width": "64",
        "height": " 32 ",
        "guidance_scale": "6.5",
        "num_images": "2",
    }
    answer = client.post("/api/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    parameters = answer.json()["parameters"]
    assert parameters["steps"] == 3 and parameters["seeds"] == [42, 43] and parameters["guidance_scale"] == 6.5
    assert (parameters["width"], parameters["height"]) == (64, 32)
    job = client.post("/api/jobs", json={**body, "priority": "5", "num_images": "1"})
    assert job.status_code == 202, job.text
    assert client.get(f"/api/jobs/{job.json()['id']}").json()["priority"] == 5


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("steps", "2.5", "valid integer"),
        ("steps", "two", "valid integer"),
        ("steps", True, "valid integer"),
        ("steps", "true", "valid integer"),
        ("seed", "1e3", "valid integer"),
        ("guidance_scale", "nan", "valid number"),
        ("guidance_scale", "Infinity", "valid number"),
        ("num_images", ["2"], "valid integer"),
        ("prompt", 5, "valid string"),
        ("output_format", ["png"], ""),
    ],
)
def test_no_other_coercion(client: httpx.Client, field: str, value: Any, fragment: str) -> None:
    response = client.post("/api/txt2img", json={"prompt": "x", field: value})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == field and fragment in error["message"]


def test_numeric_strings_still_meet_the_limits(client: httpx.Client) -> None:
    response = client.post("/api/txt2img", json={"prompt": "x", "steps": "0"})
    assert response.status_code == 422 and response.json()["error"]["param"] == "steps"


@pytest.mark.parametrize("accept", ["image/*", "image/png", "image/webp"])
def test_a_raw_answer_never_drops_an_image(client: httpx.Client, accept: str) -> None:
    response = client.post("/api/txt2img", json={"prompt": "two foxes", "num_images": 2}, headers={"Accept": accept})
    assert response.status_code == 406, response.text
    error = response.json()["error"]
    assert error["type"] == "not_acceptable" and error["param"] == "num_images"
    assert client.get("/api/jobs").json()["jobs"] == []  # refused before a job was made


def test_response_format_file(client: httpx.Client) -> None:
    """n8n's "File" format: Accept image/*, one image, the body is the image with its name."""
    response = client.post(
        "/api/txt2img", json={"prompt": "a fox", "seed": "9", "steps": "2"}, headers={"Accept": "image/*"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["content-disposition"].startswith('inline; filename="')
    assert response.headers["x-seed"] == "9"
    with Image.open(io.BytesIO(response.content)) as image:
        assert seed_of(image) == 9
