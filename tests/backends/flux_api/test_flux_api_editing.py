"""flux-api with images, against the fake BFL server: FLUX.2 reference images as input_image,
input_image_2... within each model's limit, Kontext's one image, a mask sent to flux-pro-1.0-fill at the
image's size, and inputs re-encoded from their pixels (the upload's metadata never leaves)."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable

import pytest
from PIL import Image

from imagegen.backends.base import RunContext
from imagegen.backends.bfl.backend import FluxApiBackend
from imagegen.backends.bfl.models import FILL_MODEL
from imagegen.config import Settings
from imagegen.errors import InvalidParameterError
from imagegen.storage.image_decoding import decode_image
from tests.backends.flux_api.conftest import RunningFake
from tests.support.editing import gradient, half_mask, png_bytes, resolve, store


def sent_image(value: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(value)))
    image.load()
    return image


async def generate(backend: FluxApiBackend, **params: object) -> list:
    request = resolve(backend, **params)
    return await backend.generate([request], RunContext(["job"], deadline=time.monotonic() + 30))


async def test_flux2_references_are_sent_as_input_images(
    bfl: RunningFake, bfl_settings: Callable[..., Settings]
) -> None:
    backend = FluxApiBackend(bfl_settings(bfl))
    refs = [store(backend, gradient(320 + 16 * index, 256)) for index in range(3)]
    try:
        request = resolve(backend, images=tuple(refs))
        assert request.mode == "edit" and request.model == "flux-2-klein-4b"
        assert (request.width, request.height) == (320, 256)  # the first image's size, multiples of 16
        results = await generate(backend, images=tuple(refs), seed=5)
    finally:
        await backend.close()
    assert results[0][0].image.size == (320, 256)
    body = bfl.fake.submits[0]["body"]
    assert [name for name in body if name.startswith("input_image")] == [
        "input_image",
        "input_image_2",
        "input_image_3",
    ]
    assert sent_image(body["input_image_2"]).size == (336, 256)  # each reference reaches BFL, in order
    assert (body["width"], body["height"]) == (320, 256)


async def test_reference_limits_per_model(bfl: RunningFake, bfl_settings: Callable[..., Settings]) -> None:
    backend = FluxApiBackend(bfl_settings(bfl))
    ref = store(backend, gradient(256, 256))
    try:
        with pytest.raises(InvalidParameterError) as caught:
            resolve(backend, images=(ref,) * 5)  # klein takes 4
        assert "at most 4 reference images" in caught.value.message
        assert resolve(backend, images=(ref,) * 8, model="flux-2-pro").mode == "edit"
        with pytest.raises(InvalidParameterError) as caught:
            resolve(backend, images=(ref,) * 2, model="flux-kontext-pro")
        assert "at most 1 reference images" in caught.value.message
        # FLUX.1 [pro] takes no reference: images without a mask are a mode it cannot do.
        with pytest.raises(InvalidParameterError) as caught:
            resolve(backend, images=(ref,), model="flux-pro-1.1")
        assert "mode 'img2img' is not available on model 'flux-pro-1.1'" in caught.value.message
        caps = backend.capabilities_for("flux-pro-1.1")
        assert caps.modes == ("txt2img", "inpaint") and caps.max_input_images == 0
        await generate(backend, images=(ref,), model="flux-kontext-pro", seed=1)
    finally:
        await backend.close()
    body = bfl.fake.submits[-1]["body"]
    assert "input_image" in body and "input_image_2" not in body and body["aspect_ratio"] == "1:1"


async def test_a_mask_goes_to_fill_at_the_image_size(bfl: RunningFake, bfl_settings: Callable[..., Settings]) -> None:
    backend = FluxApiBackend(bfl_settings(bfl))
    init, mask = store(backend, gradient(400, 300)), store(backend, half_mask(400, 300))
    try:
        request = resolve(backend, images=(init,), mask=mask, strength=0.5)
        assert request.mode == "inpaint" and request.model == FILL_MODEL
        assert (request.width, request.height) == (384, 288)  # fill's multiples of 32
        assert request.steps == 50 and request.guidance_scale == 60.0 and "strength" in request.ignored
        results = await generate(backend, images=(init,), mask=mask, seed=3)
    finally:
        await backend.close()
    submit = bfl.fake.submits[-1]
    assert submit["model"] == FILL_MODEL
    assert sent_image(submit["body"]["image"]).size == (384, 288) == sent_image(submit["body"]["mask"]).size
    assert "width" not in submit["body"]
    assert results[0][0].image.size == (384, 288)


async def test_inputs_leave_re_encoded_without_the_uploads_metadata(
    bfl: RunningFake, bfl_settings: Callable[..., Settings]
) -> None:
    """Threat: GPS coordinates and camera data in a photo forwarded to a third party."""
    backend = FluxApiBackend(bfl_settings(bfl))
    exif = Image.Exif()
    exif[0x010F] = "CanaryCam"  # Make
    exif.get_ifd(0x8825)[2] = (48.0, 51.0, 24.0)  # GPSLatitude
    upload = png_bytes(gradient(256, 256), "JPEG", exif=exif.tobytes(), quality=95)
    assert b"CanaryCam" in upload
    decoded = decode_image(upload, param="images[0]", max_pixels=2**24)
    ref = store(backend, decoded.image)
    try:
        await generate(backend, images=(ref,), seed=2)
    finally:
        await backend.close()
    sent = base64.b64decode(bfl.fake.submits[-1]["body"]["input_image"])
    assert b"CanaryCam" not in sent and sent != upload and sent.startswith(b"\x89PNG")
    assert not sent_image(bfl.fake.submits[-1]["body"]["input_image"]).getexif()
