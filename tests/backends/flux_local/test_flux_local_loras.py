"""LoRAs on flux-local (tiny FLUX.2 [klein], transformer LoRAs made with PEFT) over real HTTP: the
same guarantees as on sd (tests/backends/sd/test_sd_loras.py) on the other family's loader."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.backends.flux_local.helpers import backend_health, generate, pixels
from tests.backends.sd.test_sd_loras import start

BASE = {"prompt": "a red fox in the snow", "seed": 11}


@pytest.fixture(scope="module")
def klein(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[httpx.Client]:
    yield from start(tmp_path_factory.mktemp("klein-loras"), model_dir, default_backend="flux-local")


def image_bytes(client: httpx.Client, **body: Any) -> bytes:
    return pixels(generate(client, **{**BASE, **body})["images"][0]).tobytes()


def lora(name: str, weight: float = 1.0) -> dict[str, Any]:
    return {"name": name, "weight": weight}


def test_klein_lora_weight_zero_switching_and_no_leak(klein: httpx.Client) -> None:
    baseline = image_bytes(klein)
    styled = image_bytes(klein, loras=[lora("klein-style")])
    other = image_bytes(klein, loras=[lora("klein-other")])
    assert len({baseline, styled, other}) == 3
    assert image_bytes(klein, loras=[lora("klein-style", 0.0)]) == baseline
    assert image_bytes(klein) == baseline
    # Switching between the two loaded adapters gives each one's image again, with no new load.
    loads = backend_health(klein, "flux-local")["loras"]["loads"]
    assert image_bytes(klein, loras=[lora("klein-style")]) == styled
    assert image_bytes(klein, loras=[lora("klein-other")]) == other
    assert image_bytes(klein) == baseline
    assert backend_health(klein, "flux-local")["loras"]["loads"] == loads == 2


def test_klein_batch_of_two_gets_the_lora_on_both_images(klein: httpx.Client) -> None:
    batch = generate(klein, **{**BASE, "seed": 20, "num_images": 2}, loras=[lora("klein-style")])
    assert [image["loras"][0]["name"] for image in batch["images"]] == ["klein-style", "klein-style"]
    second = pixels(batch["images"][1]).tobytes()
    alone = image_bytes(klein, seed=21, loras=[lora("klein-style")])
    plain = image_bytes(klein, seed=21)
    assert max(abs(a - b) for a, b in zip(alone, second, strict=True)) <= 1
    assert max(abs(a - b) for a, b in zip(plain, second, strict=True)) > 1


def test_an_sd_lora_on_klein_is_a_422_naming_both_and_nothing_stays_loaded(klein: httpx.Client) -> None:
    baseline = image_bytes(klein)
    response = klein.post("/api/txt2img", json={**BASE, "loras": [lora("sd-style")]})
    assert response.status_code == 422
    error = response.json()["error"]
    for word in ("'sd-style'", "Stable Diffusion", "'tiny-flux2-klein'", "FLUX.2"):
        assert word in error["message"], error
    # A LoRA whose names tell nothing: diffusers loads nothing (a logged warning), the count sees it.
    response = klein.post("/api/txt2img", json={**BASE, "loras": [lora("mystery")]})
    assert response.status_code == 422 and "none of its layers match" in response.json()["error"]["message"]
    assert image_bytes(klein) == baseline
