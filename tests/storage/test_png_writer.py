"""The PNG writer (storage/png_writer.py): real files decoded by Pillow to the same pixels, the same
metadata chunks byte for byte as Pillow writes them, and the chunk insertion used for BFL's PNGs."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFilter

from imagegen.storage import metadata, png_writer
from imagegen.storage.metadata import a1111_parameters, parse_a1111_parameters, read_metadata
from imagegen.storage.outputs import OutputStore

META = {
    "prompt": "a lighthouse, 夜\nNegative prompt: not a field",
    "negative_prompt": "blurry",
    "backend": "sd",
    "model": "tiny-sd",
    "width": 96,
    "height": 64,
    "steps": 4,
    "guidance_scale": 7.5,
    "scheduler": "euler_a",
    "seed": 1234,
    "job_id": "0" * 32,
    "version": "0.1.0",
}


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, each CRC checked."""
    assert data.startswith(png_writer.SIGNATURE)
    found, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        kind, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack_from(">I", data, offset + 8 + length)
        assert crc == zlib.crc32(kind + body), kind
        found.append((kind, body))
        offset += 12 + length
    return found


def photo_like(size: tuple[int, int] = (96, 64), mode: str = "RGB") -> Image.Image:
    """Smooth shapes with a little grain: what a real render compresses like (not noise)."""
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((size[0] // 8, 0, size[0] // 2, size[1] - 1), fill=(200, 40, 90))
    image = image.filter(ImageFilter.GaussianBlur(3))
    grain = Image.effect_noise(size, 8).convert("L")
    image = Image.merge("RGB", [Image.blend(band, grain, 0.1) for band in image.split()])
    return image.convert(mode)


def noise(size: tuple[int, int], mode: str) -> Image.Image:
    channels = len(mode)
    return Image.frombytes(mode, size, os.urandom(size[0] * size[1] * channels))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
@pytest.mark.parametrize("size", [(96, 64), (1, 1), (1, 37), (37, 1), (257, 3)])
def test_files_decode_to_the_same_pixels(mode: str, size: tuple[int, int]) -> None:
    for image in (noise(size, mode), photo_like(size, mode)):
        data = png_writer.encode_png(image, metadata.png_info(META))
        with Image.open(io.BytesIO(data)) as decoded:
            assert decoded.format == "PNG" and decoded.mode == mode and decoded.size == size
            assert decoded.tobytes() == image.tobytes()


def test_chunks_are_the_ones_pillow_writes_in_the_same_order() -> None:
    image = photo_like()
    ours = chunks(png_writer.encode_png(image, metadata.png_info(META)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=metadata.png_info(META), compress_level=1)
    pillows = chunks(buffer.getvalue())
    # Same header, same text chunks byte for byte, before the image data; one IDAT; IEND last.
    assert [kind for kind, _ in ours] == [
        b"IHDR",
        b"tEXt" if META["prompt"].isascii() else b"iTXt",
        b"iTXt",
        b"IDAT",
        b"IEND",
    ]
    assert ours[0] == pillows[0]
    text = [(kind, body) for kind, body in ours if kind in (b"tEXt", b"iTXt")]
    assert text == [(kind, body) for kind, body in pillows if kind in (b"tEXt", b"iTXt")]
    for kind, body in text:
        keyword, _, value = body.partition(b"\0")
        assert keyword in (b"parameters", b"imagegen")
        # No NUL in the text itself (iTXt's header has its own after the keyword: flag, method, lang, key).
        assert b"\0" not in (value if kind == b"tEXt" else value[2:].split(b"\0", 2)[2])
    # Every row uses the Up filter.
    raw = zlib.decompress(b"".join(body for kind, body in ours if kind == b"IDAT"))
    stride = image.width * 3 + 1
    assert {raw[row * stride] for row in range(image.height)} == {png_writer.FILTER_UP}


def test_metadata_reads_back_through_every_reader(tmp_path: Path) -> None:
    store = OutputStore(tmp_path)
    saved = store.save(photo_like(), "png", META)
    assert saved.path.read_bytes() == saved.data
    found = read_metadata(saved.path)
    assert found == {"parameters": a1111_parameters(META), "imagegen": META}
    # What A1111's PNG info shows (the service's png-info route parses with the same function).
    fields = parse_a1111_parameters(found["parameters"])
    assert fields["Prompt"] == "a lighthouse, 夜 Negative prompt: not a field"
    assert fields["Negative prompt"] == "blurry" and fields["Seed"] == "1234" and fields["Size-1"] == 96
    with Image.open(saved.path) as image:  # Pillow's own view of the text chunks
        assert image.text["parameters"] == a1111_parameters(META)


def test_other_modes_go_to_pillow(tmp_path: Path) -> None:
    store = OutputStore(tmp_path)
    palette = photo_like().convert("P")
    assert not png_writer.supported(palette)
    saved = store.save(palette, "png", META)
    with Image.open(saved.path) as image:
        assert image.mode == "P" and image.tobytes() == palette.tobytes()
    assert read_metadata(saved.path)["imagegen"] == META


def test_inserted_chunks_replace_old_ones_and_leave_the_image_data_as_it_was() -> None:
    buffer = io.BytesIO()
    old = metadata.png_info({**META, "prompt": "old prompt"})
    photo_like().save(buffer, format="PNG", pnginfo=old)
    original = chunks(buffer.getvalue())
    inserted = png_writer.insert_text_chunks(buffer.getvalue() + b"\0\0", metadata.png_info(META))
    found = chunks(inserted)
    assert found[0] == original[0]
    assert [body for kind, body in found if kind == b"IDAT"] == [body for kind, body in original if kind == b"IDAT"]
    assert len([kind for kind, _ in found if kind in (b"tEXt", b"iTXt")]) == 2  # the old two are gone
    assert read_metadata(io.BytesIO(inserted)) == {"parameters": a1111_parameters(META), "imagegen": META}
    with Image.open(io.BytesIO(inserted)) as image, Image.open(buffer) as before:
        assert image.tobytes() == before.tobytes()


@pytest.mark.parametrize(
    "damage",
    [lambda data: data[:40], lambda data: b"GIF89a" + data[6:], lambda data: data[:8] + data[33:]],
    ids=["truncated", "not-png", "no-ihdr-first"],
)
def test_insertion_refuses_what_is_not_a_well_formed_png(damage: object) -> None:
    buffer = io.BytesIO()
    photo_like().save(buffer, format="PNG")
    with pytest.raises(ValueError):
        png_writer.insert_text_chunks(damage(buffer.getvalue()), metadata.png_info(META))  # type: ignore[operator]
