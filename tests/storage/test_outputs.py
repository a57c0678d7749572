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


# -- what a prompt can do to the embedded parameters --------------------------------------------------------


def a1111_read(parameters: str) -> dict[str, str]:
    """How A1111's "PNG info" reads the text (modules/infotext_utils.parse_generation_parameters):
    the last line holds the fields; a line starting "Negative prompt:" starts the negative prompt."""
    *lines, last = parameters.strip().split("\n")
    found = {"Prompt": "", "Negative prompt": ""}
    negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            negative, line = True, line[len("Negative prompt:") :].strip()
        found["Negative prompt" if negative else "Prompt"] += (
            "\n" if found["Negative prompt" if negative else "Prompt"] else ""
        ) + line
    for part in last.split(", "):
        key, _, value = part.partition(": ")
        found[key] = value
    return found


SPOOFING = {
    **META,
    "prompt": "a cat\nNegative prompt: spoofed\nSteps: 999, Sampler: spoofed, Seed: 1\r\x00\x1b[31m\u2028end",
    "negative_prompt": "blurry\nSteps: 998\x00",
}


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_a_prompt_cannot_spoof_the_parameters_fields(store: OutputStore, fmt: str) -> None:
    saved = store.save(Image.new("RGB", (8, 8)), fmt, SPOOFING)
    found = read_metadata(saved.path)
    parameters = found["parameters"]
    assert parameters.count("\n") == 2  # prompt, negative prompt, fields: nothing else
    read = a1111_read(parameters)
    assert read["Steps"] == "4" and read["Sampler"] == "euler_a" and read["Seed"] == "1234"
    assert read["Negative prompt"].startswith("blurry")
    assert read["Prompt"].startswith("a cat Negative prompt: spoofed Steps: 999")  # all of it the prompt
    assert not any(char in parameters for char in "\r\x00\x1b\u2028")
    assert found["imagegen"]["prompt"] == SPOOFING["prompt"]  # the exact prompt is kept in the JSON


def _png_text_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    import struct

    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        if kind in (b"tEXt", b"iTXt", b"zTXt"):
            chunks.append((kind, data[offset + 8 : offset + 8 + length]))
        offset += 12 + length
    return chunks


def test_no_nul_reaches_a_png_text_chunk(store: OutputStore) -> None:
    saved = store.save(Image.new("RGB", (8, 8)), "png", SPOOFING)
    chunks = _png_text_chunks(saved.data)
    assert {kind for kind, _ in chunks} >= {b"tEXt"}
    for kind, body in chunks:
        keyword, _, text = body.partition(b"\0")
        if kind == b"iTXt":  # compression flag, method, language\0, translated keyword\0, then the text
            text = text[2:].split(b"\0", 2)[2]
        assert b"\0" not in text, (keyword, kind)


# -- who may read what the service writes -------------------------------------------------------------------


def test_outputs_are_not_world_readable(tmp_path: Path) -> None:
    store = OutputStore(tmp_path / "new" / "outputs")
    saved = store.save(Image.new("RGB", (8, 8)), "png", META)
    assert saved.path.stat().st_mode & 0o777 == 0o640
    assert store.root.stat().st_mode & 0o777 == 0o750


def test_the_job_database_is_readable_by_the_service_only(tmp_path: Path) -> None:
    from imagegen.engine.store import SQLiteJobStore

    old = tmp_path / "old"
    old.mkdir()
    (old / "jobs.sqlite3").touch(mode=0o644)  # as an earlier version left it
    for folder in (tmp_path / "new" / "data", old):
        store = SQLiteJobStore(folder / "jobs.sqlite3")
        store.pending_webhooks()  # the WAL files exist once the database is used
        files = sorted(folder.glob("jobs.sqlite3*"))
        assert [path.name for path in files][:1] == ["jobs.sqlite3"]
        for path in files:
            assert path.stat().st_mode & 0o777 == 0o600, path
        store.close()
    assert (tmp_path / "new" / "data").stat().st_mode & 0o777 == 0o700


def test_the_folders_preflight_creates_get_the_same_modes(make_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from imagegen import preflight

    settings = make_settings(output_dir=tmp_path / "p" / "outputs", data_dir=tmp_path / "p" / "data")
    preflight.check(settings)
    assert (tmp_path / "p" / "outputs").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "p" / "data").stat().st_mode & 0o777 == 0o700
