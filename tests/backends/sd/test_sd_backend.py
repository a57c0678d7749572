"""The sd backend across families (SD 1.x-style, SDXL-style) and its safety checker policy,
on real tiny pipelines through HTTP."""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

from imagegen.backends.local import tiny_models


@pytest.fixture(scope="session")
def flagging_models(model_dir: Path) -> dict[str, Path]:
    """A tiny SD 1.x model whose own checker flags everything, and a standalone flag-all checker."""
    root = model_dir / "test-fixtures"
    sd = root / "tiny-sd-flag-all"
    checker = root / "checker-flag-all"
    if not sd.exists():
        tiny_models.build(functools.partial(tiny_models.build_tiny_sd, flag_all=True), sd)
    if not checker.exists():
        tiny_models.build(functools.partial(tiny_models.build_tiny_safety_checker, flag_all=True), checker)
    return {"sd": sd, "checker": checker}


def outputs_in(client: httpx.Client) -> list[Path]:
    root = client.app.state.services.outputs.root  # type: ignore[attr-defined]
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


def test_sdxl_family_generates_and_reproduces(serve: Callable[..., httpx.Client]) -> None:
    client = serve(model_id="tiny-sdxl")
    backend = client.get("/api/backends").json()["backends"][0]
    assert backend["family"] == "sdxl" and backend["pipeline_class"] == "StableDiffusionXLPipeline"
    assert backend["capabilities"]["default_guidance"] == 5.0
    # SDXL ships no checker: the standalone one is loaded for it.
    assert backend["safety_checker"] == tiny_models.TINY_SAFETY_CHECKER
    bodies = [client.post("/api/txt2img", json={"prompt": "a castle", "seed": 8, "steps": 3}).json() for _ in range(2)]
    first, second = (base64.b64decode(body["images"][0]["b64"]) for body in bodies)
    assert Image.open(io.BytesIO(first)).tobytes() == Image.open(io.BytesIO(second)).tobytes()
    with_negative = client.post(
        "/api/txt2img", json={"prompt": "a castle", "negative_prompt": "fog", "seed": 8, "steps": 3}
    )
    assert with_negative.status_code == 200
    assert with_negative.json()["images"][0]["b64"] != bodies[0]["images"][0]["b64"]


def test_flagged_image_is_reported_and_never_returned(serve: Callable[..., httpx.Client], flagging_models) -> None:
    client = serve(model_id=str(flagging_models["sd"]))
    body = client.post("/api/txt2img", json={"prompt": "anything", "seed": 1, "num_images": 2, "steps": 2}).json()
    for image in body["images"]:
        assert image["nsfw"] is True
        assert image["b64"] is None and image["url"] is None and image["filename"] is None
    assert outputs_in(client) == []  # nothing flagged is written to disk
    raw = client.post("/api/txt2img", json={"prompt": "x", "steps": 2}, headers={"Accept": "image/png"})
    assert raw.status_code == 422 and raw.json()["error"]["type"] == "content_moderated"


def test_standalone_checker_applies_to_models_without_one(serve: Callable[..., httpx.Client], flagging_models) -> None:
    client = serve(model_id="tiny-sdxl", safety_checker_id=str(flagging_models["checker"]))
    image = client.post("/api/txt2img", json={"prompt": "x", "steps": 2}).json()["images"][0]
    assert image["nsfw"] is True and image["b64"] is None


def test_checker_can_be_switched_off(serve: Callable[..., httpx.Client], flagging_models) -> None:
    client = serve(model_id=str(flagging_models["sd"]), safety_checker=False)
    health = client.get("/health").json()["backends"]["sd"]
    assert health["safety_checker"] is None and health["safety_checker_enabled"] is False
    image = client.post("/api/txt2img", json={"prompt": "x", "steps": 2}).json()["images"][0]
    assert image["nsfw"] is False and image["b64"]


def test_unflagged_images_pass_the_tiny_checker(sd_client: httpx.Client) -> None:
    body = sd_client.post("/api/txt2img", json={"prompt": "a tree", "num_images": 2, "steps": 2}).json()
    assert [image["nsfw"] for image in body["images"]] == [False, False]


def test_several_models_one_loaded_at_a_time(serve: Callable[..., httpx.Client]) -> None:
    """SD_MODELS: the sd backend serves tiny-sd and tiny-sdxl, switching through the unload path; a
    model outside the list is a 422 (no request makes the service load or download anything else)."""
    client = serve(model_id="tiny-sd", models=["tiny-sdxl"])
    backend = client.get("/api/backends").json()["backends"][0]
    assert backend["capabilities"]["models"] == ["tiny-sd", "tiny-sdxl"]
    body = client.post("/api/txt2img", json={"prompt": "a castle", "model": "tiny-sdxl", "steps": 2}).json()
    assert body["model"] == "tiny-sdxl" and body["parameters"]["guidance_scale"] == 5.0  # SDXL's own default
    health = client.get("/health").json()["backends"]["sd"]
    assert health["model"] == "tiny-sdxl" and health["last_unload"]["reason"] == "switching to model tiny-sdxl"
    assert health["residency"]["loaded_pipelines"] == ["sd"]
    body = client.post("/api/txt2img", json={"prompt": "a castle", "steps": 2}).json()
    assert body["model"] == "tiny-sd" and body["parameters"]["guidance_scale"] == 7.5  # the default model again
    refused = client.post("/api/txt2img", json={"prompt": "a castle", "model": "runwayml/stable-diffusion-v1-5"})
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "model"
    assert "tiny-sdxl" in refused.json()["error"]["message"]
