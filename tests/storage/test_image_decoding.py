"""Untrusted images are decoded safely (storage/image_decoding.py): sniffed formats only, the size
checked from the header before decoding (decompression bombs), truncated and corrupt data refused as a
4xx naming the field, animated images give their first frame, EXIF orientation applied, every mode
normalised. Each threat is named in the test."""

from __future__ import annotations

import base64
import io
import tracemalloc

import pytest
from PIL import Image

from imagegen.errors import InvalidParameterError
from imagegen.storage.image_decoding import (
    decode_base64,
    decode_image,
    flatten,
    mask_from_paint,
    mask_from_transparency,
    pixel_digest,
    sniff,
    transparency_mask,
)
from tests.support.editing import png_bomb

LIMIT = 4096 * 4096


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_formats_are_sniffed_from_the_bytes_not_the_name() -> None:
    image = Image.new("RGB", (8, 6), (10, 200, 30))
    assert sniff(encode(image, "PNG")) == "PNG"
    assert sniff(encode(image, "JPEG")) == "JPEG"
    assert sniff(encode(image, "WEBP")) == "WEBP"
    for fmt in ("GIF", "BMP", "TIFF"):
        with pytest.raises(InvalidParameterError) as caught:
            decode_image(encode(image, fmt), param="image", max_pixels=LIMIT)
        assert caught.value.param == "image" and "PNG, JPEG or WebP" in caught.value.message
    # SVG (stored XSS in peers) and HTML are not images here.
    with pytest.raises(InvalidParameterError):
        decode_image(b"<svg xmlns='http://www.w3.org/2000/svg'/>", param="image", max_pixels=LIMIT)


def test_a_jpeg_named_png_decodes_as_the_jpeg_it_is() -> None:
    decoded = decode_image(encode(Image.new("RGB", (16, 8), (255, 0, 0)), "JPEG"), param="image", max_pixels=LIMIT)
    assert decoded.source_format == "JPEG" and (decoded.width, decoded.height) == (16, 8)


def test_decompression_bomb_is_refused_from_its_header_before_decoding() -> None:
    """Threat: a 40 MP PNG of a few hundred bytes that decodes to 120 MB (and a 100k x 100k one)."""
    for width, height in ((8000, 5000), (100_000, 100_000)):
        data = png_bomb(width, height)
        assert len(data) < 1000
        tracemalloc.start()
        with pytest.raises(InvalidParameterError) as caught:
            decode_image(data, param="images[0]", max_pixels=LIMIT)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 5 * 2**20  # nothing was decoded
        assert caught.value.param == "images[0]" and "SD_MAX_INPUT_PIXELS" in caught.value.message


def test_truncated_and_corrupt_files_are_a_4xx() -> None:
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    for broken in (data[: len(data) // 2], data[:40], data[: len(data) - 300], b"\x89PNG\r\n\x1a\n" + b"\0" * 50):
        with pytest.raises(InvalidParameterError) as caught:
            decode_image(broken, param="mask", max_pixels=LIMIT)
        assert caught.value.param == "mask"
    jpeg = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(InvalidParameterError):
        decode_image(jpeg[: len(jpeg) // 3], param="image", max_pixels=LIMIT)


def test_an_animated_image_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    for fmt in ("PNG", "WEBP"):
        buffer = io.BytesIO()
        frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], lossless=True)
        decoded = decode_image(buffer.getvalue(), param="image", max_pixels=LIMIT)
        assert decoded.frames == 3
        assert decoded.image.getpixel((4, 4)) == (255, 0, 0)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95), param="image", max_pixels=LIMIT)
    assert (decoded.width, decoded.height) == (20, 40)
    assert decoded.image.getpixel((10, 2))[0] > 200  # the white band is now on top


@pytest.mark.parametrize(
    ("image", "alpha"),
    [
        (Image.new("L", (8, 8), 128), False),
        (Image.new("1", (8, 8), 1), False),
        (Image.new("P", (8, 8), 3), False),
        (Image.new("LA", (8, 8), (200, 0)), True),
        (Image.new("RGBA", (8, 8), (1, 2, 3, 0)), True),
        (Image.new("I;16", (8, 8), 65535), False),
    ],
    ids=["grayscale", "bilevel", "palette", "gray-alpha", "rgba", "16-bit"],
)
def test_every_mode_becomes_rgb_or_rgba(image: Image.Image, alpha: bool) -> None:
    decoded = decode_image(encode(image, "PNG"), param="image", max_pixels=LIMIT)
    assert decoded.image.mode == ("RGBA" if alpha else "RGB")
    if image.mode == "I;16":
        assert decoded.image.getpixel((0, 0)) == (255, 255, 255)  # scaled, not clipped or black
    assert flatten(decoded).mode == "RGB"


def test_cmyk_jpeg_and_palette_with_transparency() -> None:
    cmyk = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), param="i", max_pixels=LIMIT)
    assert cmyk.image.mode == "RGB" and cmyk.image.getpixel((0, 0))[0] > 200
    palette = Image.new("P", (8, 8), 0)
    palette.info["transparency"] = 0
    assert decode_image(encode(palette, "PNG", transparency=0), param="i", max_pixels=LIMIT).has_alpha


def test_masks_by_paint_and_by_transparency() -> None:
    painted = Image.new("RGB", (8, 8), (0, 0, 0))
    painted.paste((255, 255, 255), (0, 0, 4, 8))
    mask = mask_from_paint(decode_image(encode(painted), param="mask", max_pixels=LIMIT))
    assert mask.mode == "L" and mask.getpixel((1, 1)) == 255 and mask.getpixel((6, 1)) == 0

    openai_mask = Image.new("RGBA", (8, 8), (0, 0, 0, 255))
    openai_mask.paste((0, 0, 0, 0), (4, 0, 8, 8))  # transparent right half = edit
    decoded = decode_image(encode(openai_mask), param="mask", max_pixels=LIMIT)
    edit = mask_from_transparency(decoded, param="mask")
    assert edit.getpixel((6, 1)) == 255 and edit.getpixel((1, 1)) == 0
    assert transparency_mask(decoded) is not None
    with pytest.raises(InvalidParameterError) as caught:
        mask_from_transparency(decode_image(encode(painted), param="mask", max_pixels=LIMIT), param="mask")
    assert "alpha channel" in caught.value.message


def test_base64_and_data_urls_but_never_a_url() -> None:
    data = encode(Image.new("RGB", (4, 4)))
    bare = base64.b64encode(data).decode()
    assert decode_base64(bare, param="images[0]") == data
    assert decode_base64("data:image/png;base64," + bare, param="images[0]") == data
    assert decode_base64(bare.rstrip("="), param="images[0]") == data  # padding optional
    assert decode_base64(bare[:20] + "\n" + bare[20:], param="images[0]") == data
    # Threat: A1111 fetched URLs given as images (SSRF). Nothing here ever fetches.
    for url in ("http://169.254.169.254/latest/meta-data", "https://example.com/a.png", "file:///etc/passwd"):
        with pytest.raises(InvalidParameterError) as caught:
            decode_base64(url, param="init_images[0]")
        assert "never fetched" in caught.value.message and caught.value.param == "init_images[0]"
    with pytest.raises(InvalidParameterError):
        decode_base64("not base64 at all!", param="mask")
    with pytest.raises(InvalidParameterError):
        decode_base64("  ", param="mask")


def test_pixel_digest_follows_pixels_not_files() -> None:
    image = Image.effect_noise((16, 16), 40).convert("RGB")
    from_png = decode_image(encode(image, "PNG"), param="i", max_pixels=LIMIT).image
    from_webp = decode_image(encode(image, "WEBP", lossless=True), param="i", max_pixels=LIMIT).image
    assert pixel_digest(from_png) == pixel_digest(from_webp)
    assert pixel_digest(from_png) != pixel_digest(from_png.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
