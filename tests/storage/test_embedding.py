"""Metadata inserted into images encoded elsewhere (storage/embedding.py): JPEG segments next to the
entropy-coded data left byte for byte, the same EXIF/XMP as our own JPEGs, and the cheap checks."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from PIL import Image

from imagegen.generation import EncodedImage
from imagegen.storage import embedding, metadata
from imagegen.storage.metadata import a1111_parameters, read_metadata
from imagegen.storage.outputs import OutputStore
from tests.storage.test_png_writer import META, photo_like


def segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, payload) of every segment up to SOS, then (SOS, the rest)."""
    assert data.startswith(b"\xff\xd8")
    found, offset = [], 2
    while True:
        marker = data[offset + 1]
        if marker == 0xDA:
            found.append((marker, data[offset:]))
            return found
        (length,) = struct.unpack_from(">H", data, offset + 2)
        found.append((marker, data[offset + 4 : offset + 2 + length]))
        offset += 2 + length


def jpeg(**options: object) -> bytes:
    buffer = io.BytesIO()
    photo_like().save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def test_a_jpeg_gets_the_segments_pillow_writes_for_our_own_jpegs() -> None:
    delivered = jpeg()
    embedded = embedding.embed(delivered, "jpeg", META)
    ours = segments(embedded)
    buffer = io.BytesIO()
    photo_like().save(buffer, format="JPEG", quality=90, exif=metadata.exif_bytes(META), xmp=metadata.xmp_packet(META))
    pillows = segments(buffer.getvalue())
    assert ours[:3] == pillows[:3]  # JFIF APP0, then APP1 EXIF, then APP1 XMP: the same bytes
    assert [s for s in ours if s not in ours[1:3]] == segments(delivered)  # nothing else changed
    assert read_metadata(io.BytesIO(embedded)) == {"parameters": a1111_parameters(META), "imagegen": META}
    with Image.open(io.BytesIO(embedded)) as image, Image.open(io.BytesIO(delivered)) as before:
        assert image.tobytes() == before.tobytes()


def test_older_exif_and_xmp_are_replaced_and_other_segments_kept() -> None:
    stale = {**META, "prompt": "stale"}
    delivered = jpeg(exif=metadata.exif_bytes(stale), xmp=metadata.xmp_packet(stale), icc_profile=b"\0" * 200)
    embedded = embedding.embed(delivered, "jpeg", META)
    assert read_metadata(io.BytesIO(embedded))["imagegen"] == META
    app1 = [payload for marker, payload in segments(embedded) if marker == 0xE1]
    assert len(app1) == 2 and b"stale" not in b"".join(app1)
    assert [s for s in segments(embedded) if s[0] == 0xE2] == [s for s in segments(delivered) if s[0] == 0xE2]


def test_without_jfif_the_segments_follow_soi() -> None:
    delivered = jpeg()
    app0 = segments(delivered)[0]
    assert app0[0] == 0xE0
    bare = delivered[:2] + delivered[2 + 4 + len(app0[1]) :]  # SOI, then the quantisation tables
    embedded = embedding.embed(bare, "jpeg", META)
    assert [marker for marker, _ in segments(embedded)][:2] == [0xE1, 0xE1]
    assert read_metadata(io.BytesIO(embedded))["imagegen"] == META


def test_webp_and_broken_bytes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        embedding.embed(b"RIFF....WEBP", "webp", META)
    with pytest.raises(ValueError):
        embedding.embed(b"\xff\xd8\xff\xe0\xff\xff", "jpeg", META)  # a length past the end
    with pytest.raises(ValueError):
        OutputStore(tmp_path).save_encoded(EncodedImage(b"not a png", "png", 1, 1), META)
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_check_encoded_reads_the_size_and_refuses_truncation(fmt: str) -> None:
    buffer = io.BytesIO()
    photo_like().save(buffer, format=fmt.upper())
    data = buffer.getvalue()
    assert embedding.check_encoded(data, fmt, max_pixels=96 * 64) == (96, 64)
    with pytest.raises(embedding.ImageTooLargeError):
        embedding.check_encoded(data, fmt, max_pixels=96 * 64 - 1)
    with pytest.raises(ValueError):
        embedding.check_encoded(data[:-20], fmt, max_pixels=10**6)
    with pytest.raises(ValueError):
        embedding.check_encoded(data, "png" if fmt == "jpeg" else "jpeg", max_pixels=10**6)
