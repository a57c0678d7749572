"""LoRAs through the real A1111 client (`webuiapi`): `<lora:name:weight>` in the prompt is applied
and removed from the text the model sees, the infotext carries the tag and the file's hash as A1111
writes them, /sdapi/v1/loras lists the folder as A1111 does, refresh-loras sees a new file."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import webuiapi

from tests.compat.conftest import Service, start_service
from tests.compat.test_webuiapi import connect
from tests.support.loras import lora_folder


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """A folder of its own (refresh-loras adds to it): the sd fixture LoRAs, copied."""
    folder = tmp_path_factory.mktemp("a1111-loras")
    for name in ("sd-style", "sd-unet-only", "sdxl-style"):
        shutil.copyfile(lora_folder(model_dir) / f"{name}.safetensors", folder / f"{name}.safetensors")
    return folder


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, lora_dir: Path) -> Iterator[Service]:
    yield from start_service(tmp_path_factory.mktemp("compat-loras"), model_dir, lora_dir=lora_dir)


@pytest.fixture(scope="module")
def api(service: Service) -> Iterator[webuiapi.WebUIApi]:
    client = connect(service)
    yield client
    client.session.close()


def run(api: webuiapi.WebUIApi, prompt: str, **options: object) -> webuiapi.WebUIApiResult:
    return api.txt2img(prompt=prompt, seed=5, steps=3, width=64, height=64, sampler_name="DDIM", **options)


def test_lora_tags_are_applied_and_leave_the_prompt(api: webuiapi.WebUIApi, lora_dir: Path) -> None:
    import hashlib

    plain = run(api, "a red fox")
    tagged = run(api, "a red fox <lora:sd-style:0.8>")
    assert tagged.image.tobytes() != plain.image.tobytes()
    # The tag left the text the model saw: the same prompt with the tag at weight 0 is the plain image.
    assert run(api, "a red fox <lora:sd-style:0>").image.tobytes() == plain.image.tobytes()
    assert run(api, "a red fox").image.tobytes() == plain.image.tobytes()  # nothing left behind
    digest = hashlib.sha256((lora_dir / "sd-style.safetensors").read_bytes()).hexdigest()[:12]
    infotext = tagged.info["infotexts"][0]
    assert infotext.startswith("a red fox <lora:sd-style:0.8>\n")
    assert f'Lora hashes: "sd-style: {digest}"' in infotext
    assert tagged.info["extra_generation_params"]["Lora hashes"] == f"sd-style: {digest}"
    assert tagged.info["prompt"] == "a red fox"
    # The PNG's own text chunk says the same (A1111's "PNG info" reads it back).
    assert tagged.image.info["parameters"].startswith("a red fox <lora:sd-style:0.8>\n")
    assert f'Lora hashes: "sd-style: {digest}"' in tagged.image.info["parameters"]
    # <lora:name> means weight 1; two tags apply both; every image of a batch gets them.
    batch = run(api, "<lora:sd-style> a red fox <lora:sd-unet-only:0.5>", batch_size=2)
    assert len(batch.images) == 2 and batch.info["all_seeds"] == [5, 6]
    assert all("<lora:sd-style:1> <lora:sd-unet-only:0.5>" in text for text in batch.info["infotexts"])


def test_unknown_tags_bad_weights_and_other_families_are_clear_errors(api: webuiapi.WebUIApi) -> None:
    for prompt, fragment in (
        ("a fox <lora:not-there:1>", "unknown LoRA"),
        ("a fox <lora:sd-style:lots>", "must be a number"),
        ("a fox <lora:sd-style:0.5:0.8>", "one weight"),
        ("a fox <lora:sdxl-style:1>", "'sdxl-style' is for SDXL"),
    ):
        with pytest.raises(RuntimeError) as caught:
            run(api, prompt)
        status, text = caught.value.args
        assert status == 422 and fragment in text, text
    # Other extra networks are removed, as A1111 does, and reported.
    result = run(api, "a fox <hypernet:anime:1>")
    assert "extra_networks.hypernet" in result.info["ignored_parameters"]
    assert result.info["prompt"] == "a fox"


def test_loras_listing_and_refresh(api: webuiapi.WebUIApi, service: Service, lora_dir: Path) -> None:
    listed = {entry["name"]: entry for entry in api.get_loras()}
    assert set(listed) == {"sd-style", "sd-unet-only", "sdxl-style"}
    assert listed["sd-style"]["path"] == "sd-style.safetensors" and listed["sd-style"]["alias"] == "sd-style"
    assert listed["sd-style"]["metadata"] == {"format": "pt"}
    shutil.copyfile(lora_dir / "sd-style.safetensors", lora_dir / "new-style.safetensors")
    response = api.session.post(f"{api.baseurl}/refresh-loras")
    assert response.status_code == 200 and response.json() is None
    assert "new-style" in {entry["name"] for entry in api.get_loras()}
    new = run(api, "a red fox <lora:new-style:0.8>").image.tobytes()
    assert new == run(api, "a red fox <lora:sd-style:0.8>").image.tobytes()
