"""Small HTTP helpers shared by the flux-local tests."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
from PIL import Image


def generate(client: httpx.Client, expect: int = 200, **body: Any) -> dict[str, Any]:
    body.setdefault("prompt", "a red fox in the snow")
    response = client.post("/api/txt2img", json=body)
    assert response.status_code == expect, response.text
    return response.json()


def pixels(image: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image["b64"])))


def backend_health(client: httpx.Client, backend_id: str) -> dict[str, Any]:
    return client.get("/health").json()["backends"][backend_id]
