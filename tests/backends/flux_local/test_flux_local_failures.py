"""flux-local's failure paths over real HTTP: flagged images, NaN output, wrong or missing models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from imagegen.backends.local import tiny_models
from tests.backends.flux_local.helpers import backend_health, generate, pixels


def test_safety_checker_flags_flux_images_per_image(serve: Callable[..., httpx.Client], flag_all_checker: Path) -> None:
    """The sd policy applies to FLUX: on by default, a per-image flag, no pixels for flagged images."""
    client = serve(
        flux_model_id="tiny-flux2-klein", safety_checker_id=str(flag_all_checker), default_backend="flux-local"
    )
    body = generate(client, seed=4, num_images=2)
    assert [image["nsfw"] for image in body["images"]] == [True, True]
    assert all(image["b64"] is None and image["url"] is None for image in body["images"])
    assert backend_health(client, "flux-local")["safety_checker"] == str(flag_all_checker)


def test_safety_checker_can_be_turned_off(serve: Callable[..., httpx.Client], flag_all_checker: Path) -> None:
    client = serve(
        flux_model_id="tiny-flux",
        safety_checker_id=str(flag_all_checker),
        safety_checker=False,
        default_backend="flux-local",
    )
    (image,) = generate(client, seed=4)["images"]
    assert image["nsfw"] is False and pixels(image).size == (64, 64)
    health = backend_health(client, "flux-local")
    assert health["safety_checker"] is None and health["safety_checker_enabled"] is False


def test_nan_output_is_an_error_not_an_image(
    serve: Callable[..., httpx.Client], build_fixture_model: Callable[..., Path], tiny_checker: Path
) -> None:
    folder = build_fixture_model("klein-nan-vae", tiny_models.build_tiny_flux2_klein, nan_vae=True)
    client = serve(flux_model_id=str(folder), safety_checker_id=str(tiny_checker), default_backend="flux-local")
    response = client.post("/api/txt2img", json={"prompt": "a fox", "seed": 1})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "generation_failed" and "NaN" in error["message"]
    assert not list((client.app.state.services.settings.output_dir).glob("*.png"))  # type: ignore[attr-defined]
    # The backend stays loaded and ready: the failure belongs to that one request.
    health = backend_health(client, "flux-local")
    assert health["state"] == "ready" and health["loaded"] is True


def test_a_stable_diffusion_folder_is_refused_with_a_pointer_to_sd(
    serve: Callable[..., httpx.Client], model_dir: Path
) -> None:
    folder = tiny_models.ensure_builtin(model_dir, tiny_models.TINY_SD)
    client = serve(flux_model_id=str(folder), default_backend="sd")
    response = client.post("/api/txt2img", json={"prompt": "x", "backend": "flux-local", "steps": 2})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["type"] == "backend_unavailable"
    assert "StableDiffusionPipeline" in error["message"] and "sd backend" in error["message"]
    health = backend_health(client, "flux-local")
    assert health["state"] == "error" and "not a FLUX model" in health["reason"]
    # sd is unaffected
    assert generate(client, backend="sd", seed=1, steps=2)["backend"] == "sd"


def test_a_missing_model_folder_is_a_clear_503(serve: Callable[..., httpx.Client], tmp_path: Path) -> None:
    client = serve(flux_model_id=str(tmp_path / "no-such-model"), default_backend="sd")
    response = client.post("/api/txt2img", json={"prompt": "x", "backend": "flux-local"})
    assert response.status_code == 503
    assert "does not exist" in response.json()["error"]["message"]
