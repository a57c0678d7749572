"""Output store: server-chosen names, metadata inside the files, traversal-proof serving."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from imagegen.errors import NotFoundError
from imagegen.storage.metadata import a1111_parameters, read_metadata
from imagegen.storage.outputs import NAME_PATTERN, OutputStore

META = {
    "prompt": "a lighthouse, 夜",
    "negative_prompt": "blurry",
    "backend": "sd",
    "model": "tiny-sd",
    "width": 32,
    "height": 24,
    "steps": 4,
    "guidance_scale": 7.5,
    "scheduler": "euler_a",
    "seed": 1234,
    "job_id": "0" * 32,
    "version": "0.1.0",
}


@pytest.fixture
def store(tmp_path: Path) -> OutputStore:
    return OutputStore(tmp_path / "outputs")


@pytest.mark.parametrize("fmt, mime", [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_saved_image_carries_its_parameters(store: OutputStore, fmt: str, mime: str) -> None:
    saved = store.save(Image.new("RGB", (32, 24), (10, 20, 30)), fmt, META)
    assert NAME_PATTERN.fullmatch(saved.name)
    assert saved.mime_type == mime
    assert saved.path.read_bytes() == saved.data
    found = read_metadata(saved.path)
    assert found["imagegen"] == META
    assert found["parameters"] == a1111_parameters(META)
    assert found["parameters"].startswith("a lighthouse, 夜\nNegative prompt: blurry\nSteps: 4, Sampler: euler_a")
    assert "Seed: 1234" in found["parameters"]
    with Image.open(saved.path) as image:
        assert image.size == (32, 24)
        assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]


def test_names_are_unique_and_never_from_the_caller(store: OutputStore) -> None:
    names = {store.save(Image.new("RGB", (8, 8)), "png", META).name for _ in range(50)}
    assert len(names) == 50
    assert all(NAME_PATTERN.fullmatch(name) for name in names)


def test_no_temporary_file_is_left_behind(store: OutputStore) -> None:
    store.save(Image.new("RGB", (8, 8)), "png", META)
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == []


TRAVERSAL = [
    "../secret.png",
    "..%2fsecret.png",
    "%2e%2e%2fsecret.png",
    "/etc/passwd",
    "\\..\\secret.png",
    "..\\..\\secret.png",
    "20261127-000000-aaaaaaaaaaaa.png\x00.txt",
    "20261127-000000-aaaaaaaaaaaa.png/..",
    "./20261127-000000-aaaaaaaaaaaa.png",
    "20261127-000000-AAAAAAAAAAAA.png",
    "20261127-000000-aaaaaaaaaaaa.svg",
    "20261127-000000-aaaaaaaaaaaa.html",
    "",
    ".",
    "..",
    "secret.png",
    "outputs/../secret.png",
]


@pytest.mark.parametrize("name", TRAVERSAL)
def test_traversal_names_are_not_found(store: OutputStore, name: str) -> None:
    (store.root.parent / "secret.png").write_bytes(b"secret")
    with pytest.raises(NotFoundError):
        store.resolve(name)


def test_symlink_leaving_the_folder_is_not_served(store: OutputStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not yours")
    link = store.root / "20261127-000000-abcdefabcdef.png"
    os.symlink(outside, link)
    with pytest.raises(NotFoundError):
        store.resolve(link.name)


def test_directory_with_an_image_name_is_not_served(store: OutputStore) -> None:
    (store.root / "20261127-000000-abcdefabcdef.png").mkdir()
    with pytest.raises(NotFoundError):
        store.resolve("20261127-000000-abcdefabcdef.png")


def test_a_stored_name_resolves_inside_the_root(store: OutputStore) -> None:
    saved = store.save(Image.new("RGB", (8, 8)), "webp", META)
    assert store.resolve(saved.name) == saved.path
    assert store.mime_type(saved.path) == "image/webp"
