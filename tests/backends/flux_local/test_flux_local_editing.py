"""flux-local's image-conditioned modes on the real tiny pipelines (no HTTP): FLUX.2 [klein] reference
editing (up to four images, each reaching the pipeline) and inpainting; FLUX.1 img2img and inpainting.
Output sizes follow the first image (multiples of 16), steps run are counted, seeds reproduce."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from imagegen.backends.local.flux_local import FluxLocalBackend
from imagegen.config import Settings
from imagegen.errors import InvalidParameterError
from tests.support.editing import gradient, half_mask, resolve, run, store


@pytest.fixture(scope="module")
def backend_for() -> Any:
    made: list[FluxLocalBackend] = []

    def make(settings: Settings) -> FluxLocalBackend:
        backend = FluxLocalBackend(settings)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.unload()


@pytest.fixture
def klein(make_settings: Callable[..., Settings], backend_for: Any) -> FluxLocalBackend:
    return backend_for(make_settings(flux_model_id="tiny-flux2-klein"))


@pytest.fixture
def flux1(make_settings: Callable[..., Settings], backend_for: Any) -> FluxLocalBackend:
    return backend_for(make_settings(flux_model_id="tiny-flux"))


def test_klein_edits_with_every_reference(klein: FluxLocalBackend) -> None:
    caps = klein.capabilities()
    assert caps.modes == ("txt2img", "edit", "inpaint") and caps.max_input_images == 4
    red, blue = store(klein, gradient(72, 100)), store(klein, gradient(64, 64, flip=True))
    request = resolve(klein, images=(red, blue))
    assert request.mode == "edit" and request.strength is None
    # The first image's size, rounded down to multiples of 16; never silently the native size.
    assert (request.width, request.height) == (64, 96)
    result = run(klein, request)
    assert result.first.size == (64, 96)
    assert len(result.steps) == 4  # references take no strength: every step runs
    assert run(klein, request).first.tobytes() == result.first.tobytes()
    # Each reference reaches the pipeline: one fewer, or another order, changes the image.
    assert run(klein, resolve(klein, images=(red,))).first.tobytes() != result.first.tobytes()
    assert run(klein, resolve(klein, images=(blue, red), width=64, height=96)).first.tobytes() != (
        result.first.tobytes()
    )
    with pytest.raises(InvalidParameterError) as caught:
        resolve(klein, images=(red,) * 5)
    assert caught.value.param == "images" and "at most 4 reference images" in caught.value.message
    with pytest.raises(InvalidParameterError) as caught:  # what klein's pipeline would refuse mid-job
        resolve(klein, images=(red, store(klein, gradient(40, 24))))
    assert "images[1] must be at least 64 px" in caught.value.message


def test_klein_edit_ignores_strength_and_batches_prompts(klein: FluxLocalBackend) -> None:
    ref = store(klein, gradient(64, 64))
    request = resolve(klein, images=(ref,), strength=0.5)
    assert "strength" in request.ignored
    other = resolve(klein, images=(ref,), prompt="a blue fox", seed=9)
    result = run(klein, request, other)
    assert [len(images) for images in result.images] == [1, 1]


def test_klein_inpaints_from_a_derived_pipeline(klein: FluxLocalBackend) -> None:
    init, mask = store(klein, gradient(32, 32)), store(klein, half_mask(32, 32))
    request = resolve(klein, images=(init,), mask=mask, strength=0.5, steps=4)
    assert request.mode == "inpaint"
    result = run(klein, request)
    assert len(result.steps) == 2 and result.first.size == (32, 32)
    loaded = klein._loaded
    assert loaded is not None
    derived = loaded.derived["inpaint"]
    assert type(derived).__name__ == "Flux2KleinInpaintPipeline"
    assert derived.transformer is loaded.pipe.transformer and derived.transformer.dtype == loaded.dtype


def test_flux1_img2img_and_inpaint(flux1: FluxLocalBackend) -> None:
    assert flux1.capabilities().modes == ("txt2img", "img2img", "inpaint")
    init = store(flux1, gradient(48, 32))
    request = resolve(flux1, images=(init,))
    assert request.mode == "img2img" and request.strength == 0.75 and (request.width, request.height) == (48, 32)
    result = run(flux1, request)
    assert len(result.steps) == 3  # schnell's 4 steps x 0.75
    assert result.first.size == (48, 32)
    assert run(flux1, request).first.tobytes() == result.first.tobytes()
    other = run(flux1, resolve(flux1, images=(store(flux1, gradient(48, 32, flip=True)),)))
    assert other.first.tobytes() != result.first.tobytes()
    with pytest.raises(InvalidParameterError):
        resolve(flux1, images=(init, init))  # FLUX.1 takes one init image, no references

    inpaint = resolve(flux1, images=(init,), mask=store(flux1, half_mask(48, 32)), steps=4)
    painted = run(flux1, inpaint)
    assert len(painted.steps) == 4 and painted.first.size == (48, 32)
    assert type(flux1._loaded.derived["inpaint"]).__name__ == "FluxInpaintPipeline"  # type: ignore[union-attr]
