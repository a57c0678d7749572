"""flux-api stores BFL's bytes as delivered: the metadata goes in (PNG text chunks, JPEG APP1
segments), the image data stays byte for byte; never decoded and re-encoded. Over real HTTP: service ->
fake BFL on loopback; the answer (JSON base64, raw bytes) is the stored file."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

from imagegen.storage.metadata import read_metadata
from tests.backends.flux_api.conftest import RunningFake
from tests.backends.flux_api.test_flux_api import ok, txt2img
from tests.storage.test_embedding import segments
from tests.storage.test_png_writer import chunks
from tests.support.fake_bfl import pixels_for

Service = Callable[..., httpx.Client]
PROMPT = "a lighthouse at dawn"


def delivered(fmt: str, seed: int, width: int, height: int) -> bytes:
    """What the fake BFL serves for this task (its render, done the same way)."""
    buffer = io.BytesIO()
    pixels_for(PROMPT, seed, width, height).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


def stored(client: httpx.Client, name: str) -> bytes:
    outputs = client.app.state.services.outputs  # type: ignore[attr-defined]
    return Path(outputs.resolve(name)).read_bytes()


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_the_stored_file_is_bfls_bytes_with_the_metadata_inserted(
    flux_service: Service, bfl: RunningFake, fmt: str
) -> None:
    client = flux_service(bfl)
    body = ok(txt2img(client, prompt=PROMPT, seed=77, width=256, height=192, output_format=fmt))
    (image,) = body["images"]
    data = stored(client, image["filename"])
    assert base64.b64decode(image["b64"]) == data  # the answer is the stored file
    original = delivered("PNG" if fmt == "png" else "JPEG", 77, 256, 192)
    if fmt == "png":
        kept = [(kind, chunk) for kind, chunk in chunks(data) if kind not in (b"tEXt", b"iTXt")]
        assert kept == chunks(original)  # IHDR, IDAT, IEND exactly as BFL delivered them
    else:
        ours = [s for s in segments(data) if s[0] == 0xE1]
        assert len(ours) == 2
        assert [s for s in segments(data) if s not in ours] == segments(original)
    found = read_metadata(io.BytesIO(data))
    assert found["imagegen"]["seed"] == 77 and found["imagegen"]["bfl_task_id"] == image["bfl_task_id"]
    assert "Seed: 77" in found["parameters"] and found["imagegen"]["width"] == 256
    with Image.open(io.BytesIO(data)) as decoded, Image.open(io.BytesIO(original)) as before:
        assert decoded.tobytes() == before.tobytes()
    # Raw bytes (Accept: image/*) are the same file again.
    raw = client.post(
        "/api/txt2img",
        json={"prompt": PROMPT, "backend": "flux-api", "seed": 78, "width": 256, "height": 192, "output_format": fmt},
        headers={"Accept": f"image/{fmt}"},
    )
    assert raw.status_code == 200 and raw.content == stored(client, raw.headers["content-disposition"].split('"')[1])


def test_webp_is_still_re_encoded_from_the_delivered_png(
    flux_service: Service, start_fake: Callable[..., RunningFake]
) -> None:
    bfl = start_fake(result_padding=64)  # trailing bytes after IEND, as some CDNs add: harmless
    client = flux_service(bfl)
    body = ok(txt2img(client, prompt=PROMPT, seed=5, width=128, height=128, output_format="webp"))
    data = stored(client, body["images"][0]["filename"])
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "WEBP" and image.size == (128, 128)
    assert read_metadata(io.BytesIO(data))["imagegen"]["seed"] == 5
    assert bfl.fake.submits[0]["body"]["output_format"] == "png"
