"""flux-local over real HTTP: the built-in tiny FLUX.2 [klein] and FLUX.1 pipelines, loaded from
disk by the same code path as the real checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagegen.backends.local import tiny_models
from imagegen.config import Settings
from imagegen.main import create_app
from tests.backends.flux_local.helpers import backend_health, generate, pixels
from tests.support.server import LiveServer, wait_ready


def _server(root: Path, model_dir: Path, **overrides: Any) -> Iterator[httpx.Client]:
    values: dict[str, Any] = dict(
        model_id="tiny-sd",
        model_dir=model_dir,
        output_dir=root / "outputs",
        data_dir=root / "data",
        host="127.0.0.1",
        default_backend="flux-local",
    )
    values.update(overrides)
    app = create_app(Settings(_env_file=None, **values))
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        client.app = app  # type: ignore[attr-defined]
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def klein(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[httpx.Client]:
    """The default model family (FLUX.2 klein, distilled), with CPU offload asked for (it must be
    ignored on a CPU-only machine, visibly)."""
    yield from _server(
        tmp_path_factory.mktemp("klein"), model_dir, flux_model_id="tiny-flux2-klein", flux_cpu_offload=True
    )


@pytest.fixture(scope="module")
def schnell(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[httpx.Client]:
    yield from _server(tmp_path_factory.mktemp("schnell"), model_dir, flux_model_id="tiny-flux")


def test_klein_generates_at_its_native_size_with_its_recommended_steps(klein: httpx.Client) -> None:
    body = generate(klein, seed=7)
    assert body["backend"] == "flux-local" and body["model"] == "tiny-flux2-klein"
    (image,) = body["images"]
    assert image["seed"] == 7 and image["nsfw"] is False and image["mime_type"] == "image/png"
    assert pixels(image).size == (64, 64)  # the tiny VAE's sample size stands in for 1024
    assert body["parameters"]["steps"] == 4  # distilled klein: 4 steps (model card)
    assert body["parameters"]["guidance_scale"] is None
    assert body["ignored_parameters"] == []


def test_same_seed_same_bytes_other_seed_other_image(klein: httpx.Client) -> None:
    first = pixels(generate(klein, seed=1234)["images"][0]).tobytes()
    again = pixels(generate(klein, seed=1234)["images"][0]).tobytes()
    other = pixels(generate(klein, seed=1235)["images"][0]).tobytes()
    assert first == again
    assert first != other


def test_several_images_get_consecutive_seeds_and_match_single_calls(klein: httpx.Client) -> None:
    body = generate(klein, seed=40, num_images=2)
    assert [image["seed"] for image in body["images"]] == [40, 41]
    alone = pixels(generate(klein, seed=41)["images"][0]).tobytes()
    batched = pixels(body["images"][1]).tobytes()
    # Batched item i equals the single call to ~1e-6 before quantisation: one level of rounding.
    assert max(abs(a - b) for a, b in zip(alone, batched, strict=True)) <= 1


def test_guidance_and_negative_prompt_are_reported_as_ignored_not_faked(klein: httpx.Client) -> None:
    plain = generate(klein, seed=3)
    guided = generate(klein, seed=3, guidance_scale=9.0, negative_prompt="blurry")
    assert sorted(guided["ignored_parameters"]) == ["guidance_scale", "negative_prompt"]
    assert guided["parameters"]["guidance_scale"] is None and guided["parameters"]["negative_prompt"] is None
    assert pixels(guided["images"][0]).tobytes() == pixels(plain["images"][0]).tobytes()
    assert generate(klein, seed=3, scheduler="euler_a")["ignored_parameters"] == ["scheduler"]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"width": 72}, "width", "multiple of 16"),
        ({"height": 40}, "height", "multiple of 16"),
        ({"width": 8}, "width", "at least 16"),
        ({"width": 4096}, "width", "at most"),
    ],
)
def test_bad_sizes_and_steps_are_422_naming_the_parameter(
    klein: httpx.Client, body: dict[str, Any], param: str, words: str
) -> None:
    response = klein.post("/api/txt2img", json={"prompt": "x", **body})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_parameter" and error["param"] == param and words in error["message"]


def test_non_square_and_vae_tiled_sizes(klein: httpx.Client) -> None:
    wide = generate(klein, seed=2, width=96, height=48, steps=2)
    assert pixels(wide["images"][0]).size == (96, 48)
    # 128 px is above the tiny VAE's 64 px tile size: decoded in tiles (SD_FLUX_VAE_TILING, default on).
    tiled = generate(klein, seed=2, width=128, height=128, steps=1)
    assert pixels(tiled["images"][0]).size == (128, 128)


def test_health_and_backends_describe_model_device_dtype_memory(klein: httpx.Client) -> None:
    health = backend_health(klein, "flux-local")
    assert health["state"] == "ready" and health["loaded"] is True
    assert health["model"] == "tiny-flux2-klein" and health["device"] == "cpu" and health["dtype"] == "float32"
    assert health["memory"]["rss_bytes"] > 0
    assert health["pipeline_class"] == "Flux2KleinPipeline" and health["variant"] == "flux2-klein"
    assert health["guidance"] == "none" and health["default_steps"] == 4
    assert health["vae_tiling"] is True and health["safety_checker"] == "tiny-safety-checker"
    # Asked for, but model CPU offload needs an accelerator: ignored, and the reason is visible.
    assert health["cpu_offload"] is False and "needs a GPU" in health["cpu_offload_note"]
    assert health["residency"]["loaded_pipelines"] == ["flux-local"]

    listed = {item["id"]: item for item in klein.get("/api/backends").json()["backends"]}
    flux = listed["flux-local"]
    assert flux["default"] is True and flux["family"] == "flux" and flux["variant"] == "flux2-klein"
    assert flux["capabilities"]["size_multiple"] == 16
    assert flux["capabilities"]["supports_guidance"] is False
    assert flux["capabilities"]["supports_negative_prompt"] is False
    assert flux["capabilities"]["default_steps"] == 4
    assert flux["loaded"] is True and flux["dtype"] == "float32"


def test_flux1_schnell_shape(schnell: httpx.Client) -> None:
    body = generate(schnell, seed=11, guidance_scale=5.0)
    assert body["model"] == "tiny-flux" and body["parameters"]["steps"] == 4
    assert body["ignored_parameters"] == ["guidance_scale"]  # schnell has no guidance embedding
    assert pixels(body["images"][0]).size == (64, 64)
    again = generate(schnell, seed=11)
    assert pixels(again["images"][0]).tobytes() == pixels(body["images"][0]).tobytes()
    health = backend_health(schnell, "flux-local")
    assert health["pipeline_class"] == "FluxPipeline" and health["variant"] == "flux1-schnell"
    assert health["max_sequence_length"] == 256


def _guidance_changes_the_image(client: httpx.Client) -> dict[str, Any]:
    low = generate(client, seed=9, steps=2, guidance_scale=1.5)
    high = generate(client, seed=9, steps=2, guidance_scale=7.0)
    assert low["ignored_parameters"] == [] and low["parameters"]["guidance_scale"] == 1.5
    assert pixels(low["images"][0]).tobytes() != pixels(high["images"][0]).tobytes()
    return generate(client, seed=9, steps=2)


def test_flux1_dev_guidance_is_embedded_guidance(
    tmp_path: Path, model_dir: Path, build_fixture_model: Callable[..., Path], tiny_checker: Path
) -> None:
    folder = build_fixture_model("flux-dev-shaped", tiny_models.build_tiny_flux, guidance_embeds=True)
    for client in _server(tmp_path, model_dir, flux_model_id=str(folder), safety_checker_id=str(tiny_checker)):
        default = _guidance_changes_the_image(client)
        assert default["parameters"]["guidance_scale"] == 3.5  # FLUX.1 [dev] model card
        listed = {item["id"]: item for item in client.get("/api/backends").json()["backends"]}
        assert listed["flux-local"]["variant"] == "flux1-dev"
        assert listed["flux-local"]["capabilities"]["default_steps"] == 50


def test_klein_base_uses_classifier_free_guidance(
    tmp_path: Path, model_dir: Path, build_fixture_model: Callable[..., Path], tiny_checker: Path
) -> None:
    folder = build_fixture_model("klein-base", tiny_models.build_tiny_flux2_klein, distilled=False)
    for client in _server(tmp_path, model_dir, flux_model_id=str(folder), safety_checker_id=str(tiny_checker)):
        default = _guidance_changes_the_image(client)
        assert default["parameters"]["guidance_scale"] == 4.0
        assert backend_health(client, "flux-local")["variant"] == "flux2-klein-base"
