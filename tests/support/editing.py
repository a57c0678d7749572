"""Helpers of the editing tests: input images, storing them, and running a backend directly on a
request with its progress recorded (how many denoising steps really ran)."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from imagegen.backends.base import ImageBackend, RunContext
from imagegen.generation import GeneratedImage, GenerationParams, GenerationRequest, InputImage
from imagegen.storage.inputs import InputStore


def gradient(width: int, height: int, *, flip: bool = False) -> Image.Image:
    """A deterministic RGB picture (not flat: img2img has something to keep)."""
    image = Image.new("RGB", (width, height))
    for y in range(height):
        for x in range(width):
            value = (x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), 128)
            image.putpixel((width - 1 - x if flip else x, y), value)
    return image


def half_mask(width: int, height: int) -> Image.Image:
    """White (repaint) on the right half."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 2, 0, width, height))
    return mask


def png_bytes(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def b64(image: Image.Image, fmt: str = "PNG", **options: Any) -> str:
    return base64.b64encode(png_bytes(image, fmt, **options)).decode()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + b64(image)


def store(backend: ImageBackend, image: Image.Image) -> InputImage:
    return InputStore(backend.settings.inputs_dir).put(image)


@dataclass
class Run:
    images: list[list[GeneratedImage]]
    steps: list[tuple[int, int]] = field(default_factory=list)

    @property
    def first(self) -> Image.Image:
        image = self.images[0][0].image
        assert image is not None
        return image


def run(backend: ImageBackend, *requests: GenerationRequest) -> Run:
    """backend.generate on these requests (one batch), every progress report kept."""
    steps: list[tuple[int, int]] = []
    ctx = RunContext(
        [f"job{index}" for index in range(len(requests))],
        deadline=time.monotonic() + 300,
        on_progress=lambda step, total: steps.append((step, total)),
    )
    images = asyncio.run(backend.generate(list(requests), ctx))
    return Run(images, steps)


def resolve(backend: ImageBackend, **params: Any) -> GenerationRequest:
    params.setdefault("prompt", "a red fox")
    params.setdefault("seed", 7)
    return backend.resolve(GenerationParams(**params))


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with one tiny compressed row of data: the classic
    decompression bomb shape (a few hundred bytes that would decode to gigabytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
