"""The content-hash input store (storage/inputs.py) and fitting inputs to the output size
(backends/conditioning.py)."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from imagegen.backends.conditioning import fit
from imagegen.storage.inputs import InputMissingError, InputStore


def test_equal_pixels_are_stored_once_as_png_without_metadata(tmp_path: Path) -> None:
    store = InputStore(tmp_path)
    image = Image.effect_noise((32, 16), 40).convert("RGB")
    first = store.put(image)
    second = store.put(image.copy())
    assert first == second and (first.width, first.height) == (32, 16)
    assert store.names() == [f"{first.sha256}.png"]
    stored = store.path(first.sha256).read_bytes()
    assert stored.startswith(b"\x89PNG")
    reopened = Image.open(io.BytesIO(stored))
    assert reopened.info == {} or set(reopened.info) <= {"dpi"}  # no text chunks, no EXIF
    assert list(store.open(first).getdata()) == list(image.getdata())


def test_a_missing_input_is_a_clear_error(tmp_path: Path) -> None:
    store = InputStore(tmp_path)
    ref = store.put(Image.new("RGB", (4, 4), (1, 2, 3)))
    store.path(ref.sha256).unlink()
    with pytest.raises(InputMissingError) as caught:
        store.open(ref)
    assert caught.value.status_code == 422 and "send it again" in caught.value.message
    with pytest.raises(InputMissingError):
        store.path("../../etc/passwd")


def test_prune_keeps_what_jobs_use_and_what_is_recent(tmp_path: Path) -> None:
    store = InputStore(tmp_path)
    used = store.put(Image.new("RGB", (4, 4), (1, 1, 1)))
    old = store.put(Image.new("RGB", (4, 4), (2, 2, 2)))
    recent = store.put(Image.new("RGB", (4, 4), (3, 3, 3)))
    past = time.time() - 7200
    for ref in (used, old):
        os.utime(store.path(ref.sha256), (past, past))
    removed = store.prune({used.sha256}, grace=3600)
    assert removed == [old.sha256]
    assert sorted(store.names()) == sorted(f"{ref.sha256}.png" for ref in (used, recent))
    # Uploading it again makes it recent again (the grace period starts over).
    os.utime(store.path(used.sha256), (past, past))
    store.put(Image.new("RGB", (4, 4), (1, 1, 1)))
    assert store.prune(set(), grace=3600) == []


def test_fit_stretches_crops_or_pads() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    assert fit(image, 40, 20, "resize", pad=0) is image
    stretched = fit(image, 16, 16, "resize", pad=(0, 0, 0))
    assert stretched.size == (16, 16) and stretched.getpixel((0, 0)) == (255, 0, 0)
    cropped = fit(image, 16, 16, "crop", pad=(0, 0, 0))
    assert cropped.getpixel((0, 0)) == (255, 0, 0) and cropped.getpixel((15, 15)) == (255, 0, 0)
    padded = fit(image, 16, 16, "fill", pad=(0, 0, 255))
    assert padded.getpixel((8, 0)) == (0, 0, 255) and padded.getpixel((8, 8)) == (255, 0, 0)
    mask = fit(Image.new("L", (40, 20), 0), 16, 16, "fill", pad=255)
    assert mask.getpixel((8, 0)) == 255 and mask.getpixel((8, 8)) == 0
