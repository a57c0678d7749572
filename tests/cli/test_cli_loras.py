"""`imagegen models pull --lora` (a local file into SD_LORA_DIR: safetensors only, atomic, named)
and `imagegen generate --lora name:weight` against a live service."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.backends.sd.test_sd_loras import start
from tests.support.cli import run_cli
from tests.support.loras import lora_folder


def test_pull_a_lora_file_into_the_lora_folder(tmp_path: Path, model_dir: Path) -> None:
    source = lora_folder(model_dir) / "sd-style.safetensors"
    loras = tmp_path / "loras"
    result = run_cli(
        "models", "pull", "--lora", str(source), "--name", "my-style", cwd=tmp_path, SD_LORA_DIR=str(loras)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(loras / "my-style.safetensors")
    assert (loras / "my-style.safetensors").read_bytes() == source.read_bytes()
    assert "Stable Diffusion" in result.stderr and "52 layers" in result.stderr
    assert [path.name for path in loras.iterdir()] == ["my-style.safetensors"]  # no temporary file left
    # Without SD_LORA_DIR: SD_MODEL_DIR/loras, named after the file.
    result = run_cli("models", "pull", "--lora", str(source), cwd=tmp_path, SD_MODEL_DIR=str(tmp_path / "m"))
    assert result.returncode == 0 and (tmp_path / "m" / "loras" / "sd-style.safetensors").exists()


def test_pull_refuses_pickles_bad_names_and_unknown_sources(tmp_path: Path, model_dir: Path) -> None:
    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps({"x": 1}))
    (tmp_path / "old.ckpt").write_bytes(pickle.dumps({"x": 1}))
    source = lora_folder(model_dir) / "sd-style.safetensors"
    loras = tmp_path / "loras"
    for args, says in (
        (["--lora", str(tmp_path / "evil.safetensors")], "not a safetensors file"),
        (["--lora", str(tmp_path / "old.ckpt")], "only .safetensors"),
        (["--lora", str(source), "--name", "../escape"], "plain file name"),
        (["--lora", "not a path or repo"], "neither a file nor a Hugging Face repository id"),
    ):
        result = run_cli("models", "pull", *args, cwd=tmp_path, SD_LORA_DIR=str(loras))
        assert result.returncode == 2 and says in result.stderr, result.stderr
    result = run_cli("models", "pull", "--lora", "someone/some-lora", cwd=tmp_path, SD_LORA_DIR=str(loras))
    assert result.returncode == 1 and "could not be reached" in result.stderr  # offline: a reason, no traceback
    assert not loras.exists() or list(loras.iterdir()) == []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[httpx.Client]:
    yield from start(tmp_path_factory.mktemp("cli-loras"), model_dir)


def test_generate_with_lora_flags(server: httpx.Client, tmp_path: Path, model_dir: Path) -> None:
    common = ["--url", str(server.base_url), "--seed", "7", "--steps", "3", "--width", "64", "--height", "64"]
    result = run_cli(
        "generate",
        "a red fox",
        *common,
        "--lora",
        "sd-style:0.8",
        "--lora",
        "sd-unet-only",
        "--out",
        "a.png",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    meta = Image.open(tmp_path / "a.png").info["parameters"]
    digest = hashlib.sha256((lora_folder(model_dir) / "sd-style.safetensors").read_bytes()).hexdigest()[:12]
    assert meta.startswith("a red fox <lora:sd-style:0.8> <lora:sd-unet-only:1>\n") and digest in meta
    for flag, says in (("sd-style:strong", "the weight must be a number"), ("nope", "unknown LoRA")):
        result = run_cli("generate", "a red fox", *common, "--lora", flag, cwd=tmp_path)
        assert result.returncode == 2 and says in result.stderr, result.stderr
