"""Metadata put into images that arrive already encoded (BFL's results), without decoding a pixel.

A delivered PNG gets the `parameters` and `imagegen` text chunks right after IHDR (storage/png_writer),
a delivered JPEG the EXIF (APP1 "Exif") and XMP (APP1 "http://ns.adobe.com/xap/1.0/") segments that
Pillow writes for our own JPEGs, placed after the JFIF APP0 segment as Pillow places them; older
segments of those two kinds are dropped (ours replace them), every other segment (BFL's C2PA in APP11,
ICC profiles, quantisation tables...) stays byte for byte. Malformed bytes raise ValueError: the caller
then decodes and re-encodes instead.

`check_encoded` is the cheap proof that bytes are a real image before they are stored: Pillow reads the
header (format, size) and `verify()`s what it can without decoding (every PNG chunk's CRC up to IEND);
a JPEG must also end with its EOI marker (a truncated download does not).
"""

from __future__ import annotations

import io
import struct
from typing import Any

from imagegen.storage import metadata, png_writer

_SOI, _EOI, _SOS = b"\xff\xd8", b"\xff\xd9", 0xDA
_EXIF = b"Exif\x00\x00"
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
#: The largest payload of one JPEG segment (its 2-byte length counts itself).
MAX_SEGMENT = 0xFFFF - 2
#: Pillow's format names for the output formats.
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def embed(data: bytes, output_format: str, meta: dict[str, Any]) -> bytes:
    """The encoded image with the generation parameters embedded as storage/metadata.py writes them;
    ValueError for a format this cannot do without decoding (WebP) or bytes it cannot parse."""
    if output_format == "png":
        return png_writer.insert_text_chunks(data, metadata.png_info(meta))
    if output_format == "jpeg":
        return insert_jpeg_segments(data, metadata.exif_bytes(meta), metadata.xmp_packet(meta))
    raise ValueError(f"metadata cannot be embedded into {output_format} without re-encoding")


def _segment(marker: int, payload: bytes) -> bytes:
    if len(payload) > MAX_SEGMENT:
        raise ValueError("a JPEG segment holds at most 65533 bytes")
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def insert_jpeg_segments(jpeg: bytes, exif: bytes, xmp: bytes) -> bytes:
    """The JPEG with our EXIF and XMP APP1 segments after SOI (and JFIF's APP0 when it comes first)."""
    if not jpeg.startswith(_SOI):
        raise ValueError("not a JPEG")
    ours = [_segment(0xE1, exif), _segment(0xE1, _XMP + xmp)]
    parts: list[bytes | memoryview] = [_SOI]
    view = memoryview(jpeg)
    offset = 2
    placed = False
    while True:
        if offset + 4 > len(jpeg) or jpeg[offset] != 0xFF:
            raise ValueError("a JPEG segment is malformed")
        marker = jpeg[offset + 1]
        if marker == _SOS:  # the entropy-coded data follows: copied as it is, to the end
            if not placed:
                parts.extend(ours)
            parts.append(view[offset:])
            return b"".join(parts)
        (length,) = struct.unpack_from(">H", jpeg, offset + 2)
        end = offset + 2 + length
        if length < 2 or end > len(jpeg):
            raise ValueError("a JPEG segment runs past the end of the file")
        payload = jpeg[offset + 4 : offset + 4 + len(_XMP)]
        replaced = marker == 0xE1 and (payload.startswith(_EXIF) or payload.startswith(_XMP))
        if not placed and not (marker == 0xE0 and offset == 2):
            parts.extend(ours)  # after SOI, or after a leading JFIF APP0
            placed = True
        if not replaced:
            parts.append(view[offset:end])
        offset = end


class ImageTooLargeError(ValueError):
    """The image is larger than the caller allows."""


def check_encoded(data: bytes, output_format: str, *, max_pixels: int) -> tuple[int, int]:
    """The width and height of encoded bytes that must be a real `output_format` image of at most
    max_pixels; ValueError otherwise. Reads headers and checks structure; decodes no pixel."""
    from PIL import Image, UnidentifiedImageError

    expected = _PIL_FORMATS[output_format]
    try:
        with Image.open(io.BytesIO(data), formats=(expected,)) as image:
            width, height = image.size
            if width <= 0 or height <= 0 or width * height > max_pixels:
                raise ImageTooLargeError(f"an image of {width}x{height} is not an answer to this request")
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, struct.error, Image.DecompressionBombError) as error:
        raise ValueError(f"not a valid {output_format} image: {error}") from None
    if output_format == "jpeg" and not data.rstrip(b"\x00").endswith(_EOI):
        raise ValueError("the JPEG is truncated (no EOI marker)")
    return width, height
