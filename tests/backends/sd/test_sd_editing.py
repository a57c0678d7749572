"""The sd backend's image-conditioned modes on real tiny pipelines (no HTTP): img2img and inpainting
through pipelines made with from_pipe, the steps actually run (int(steps x strength)), determinism per
seed, output sizes, and a 9-channel inpainting checkpoint offered for inpainting only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imagegen.backends.local import tiny_models
from imagegen.backends.local.sd import StableDiffusionBackend
from imagegen.config import Settings
from imagegen.errors import InvalidParameterError
from tests.support.editing import gradient, half_mask, resolve, run, store


@pytest.fixture(scope="module")
def backend_for() -> Any:
    made: list[StableDiffusionBackend] = []

    def make(settings: Settings) -> StableDiffusionBackend:
        backend = StableDiffusionBackend(settings)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.unload()


@pytest.fixture
def sd(make_settings: Callable[..., Settings], backend_for: Any) -> StableDiffusionBackend:
    return backend_for(make_settings())


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def test_img2img_runs_int_steps_times_strength_from_a_shared_pipeline(sd: StableDiffusionBackend) -> None:
    init = store(sd, gradient(48, 32))
    request = resolve(sd, images=(init,), strength=0.5, steps=8)
    assert request.mode == "img2img" and (request.width, request.height) == (48, 32)  # the image's size
    result = run(sd, request)
    assert [step for step, _ in result.steps] == [1, 2, 3, 4]  # int(8 x 0.5) steps, reported each
    assert result.steps[-1][1] == 4
    assert result.first.size == (48, 32)
    loaded = sd._loaded
    assert loaded is not None
    derived = loaded.derived["img2img"]
    assert type(derived).__name__ == "StableDiffusionImg2ImgPipeline"
    assert derived.unet is loaded.pipe.unet and derived.vae is loaded.pipe.vae  # no second copy
    assert derived.unet.dtype == loaded.dtype

    again = run(sd, request)
    assert again.first.tobytes() == result.first.tobytes()  # deterministic per seed
    other_seed = run(sd, resolve(sd, images=(init,), strength=0.5, steps=8, seed=8))
    assert other_seed.first.tobytes() != result.first.tobytes()
    other_init = run(sd, resolve(sd, images=(store(sd, gradient(48, 32, flip=True)),), strength=0.5, steps=8))
    assert other_init.first.tobytes() != result.first.tobytes()  # the init image reaches the pipeline


def test_img2img_at_another_size_and_strengths(sd: StableDiffusionBackend) -> None:
    init = store(sd, gradient(40, 40))
    for mode, size in (("resize", (64, 32)), ("crop", (32, 64)), ("fill", (64, 32))):
        request = resolve(sd, images=(init,), width=size[0], height=size[1], steps=4, resize_mode=mode)
        result = run(sd, request)
        assert result.first.size == size
        assert len(result.steps) == 3  # default strength 0.75: int(4 x 0.75)
    full = run(sd, resolve(sd, images=(init,), strength=1.0, steps=5))
    assert len(full.steps) == 5


def test_zero_denoising_steps_is_a_422_not_a_crash(sd: StableDiffusionBackend) -> None:
    init = store(sd, gradient(16, 16))
    with pytest.raises(InvalidParameterError) as caught:
        resolve(sd, images=(init,), strength=0.2, steps=4)
    assert caught.value.param == "strength" and "at least one denoising step" in caught.value.message
    for strength in (0.0, 1.5, -0.1):
        with pytest.raises(InvalidParameterError) as caught:
            resolve(sd, images=(init,), strength=strength, steps=10)
        assert caught.value.param == "strength"


def test_inpainting_repaints_under_the_mask(sd: StableDiffusionBackend) -> None:
    init_image = gradient(32, 32)
    init, mask = store(sd, init_image), store(sd, half_mask(32, 32))
    request = resolve(sd, images=(init,), mask=mask, steps=6, strength=0.5)
    assert request.mode == "inpaint"
    result = run(sd, request)
    assert len(result.steps) == 3 and result.first.size == (32, 32)
    assert type(sd._loaded.derived["inpaint"]).__name__ == "StableDiffusionInpaintPipeline"  # type: ignore[union-attr]
    img2img = run(sd, resolve(sd, images=(init,), steps=6, strength=0.5))
    assert result.first.tobytes() != img2img.first.tobytes()  # the mask reaches the pipeline
    # The mask must match the image.
    with pytest.raises(InvalidParameterError) as caught:
        resolve(sd, images=(init,), mask=store(sd, half_mask(16, 32)))
    assert caught.value.param == "mask" and "32x32" in caught.value.message


def test_batched_edits_match_single_calls(sd: StableDiffusionBackend) -> None:
    init = store(sd, gradient(32, 32))
    first = resolve(sd, images=(init,), steps=4, seed=1)
    second = resolve(sd, images=(init,), steps=4, seed=2, prompt="a blue fox")
    assert first.batch_key() == second.batch_key()
    assert first.batch_key() != resolve(sd, images=(init,), steps=4, strength=0.5).batch_key()
    assert first.batch_key() != resolve(sd, images=(store(sd, gradient(32, 32, flip=True)),), steps=4).batch_key()
    together = run(sd, first, second)
    alone = run(sd, second)
    a = pixels(together.images[1][0].image)
    b = pixels(alone.first)
    assert np.abs(a - b).max() <= 2  # batched item i equals the single call, to rounding


def test_more_than_one_init_image_and_a_mask_without_image_are_refused(sd: StableDiffusionBackend) -> None:
    one, two = store(sd, gradient(16, 16)), store(sd, gradient(16, 16, flip=True))
    with pytest.raises(InvalidParameterError) as caught:
        resolve(sd, images=(one, two))
    assert caught.value.param == "images" and "one init image" in caught.value.message
    with pytest.raises(InvalidParameterError) as caught:
        resolve(sd, mask=one)
    assert caught.value.param == "mask"


def test_sdxl_img2img(make_settings: Callable[..., Settings], backend_for: Any) -> None:
    sdxl = backend_for(make_settings(model_id="tiny-sdxl"))
    init = store(sdxl, gradient(32, 32))
    result = run(sdxl, resolve(sdxl, images=(init,), steps=4, strength=0.5))
    assert len(result.steps) == 2 and result.first.size == (32, 32)
    assert type(sdxl._loaded.derived["img2img"]).__name__ == "StableDiffusionXLImg2ImgPipeline"


def test_an_inpainting_checkpoint_is_offered_for_inpainting_only(
    make_settings: Callable[..., Settings], backend_for: Any, build_fixture_model: Callable[..., Path]
) -> None:
    folder = build_fixture_model("tiny-sd-inpainting", tiny_models.build_tiny_sd, inpainting=True)
    backend = backend_for(make_settings(model_id=str(folder)))
    caps = backend.capabilities()
    assert caps.modes == ("inpaint",)  # read from unet/config.json before loading
    with pytest.raises(InvalidParameterError) as caught:
        resolve(backend)
    assert "mode 'txt2img' is not available" in caught.value.message and str(folder) in caught.value.message
    init = store(backend, gradient(32, 32))
    with pytest.raises(InvalidParameterError) as caught:
        resolve(backend, images=(init,))
    assert "mode 'img2img'" in caught.value.message
    request = resolve(backend, images=(init,), mask=store(backend, half_mask(32, 32)), steps=4)
    result = run(backend, request)
    assert len(result.steps) == 4 and result.first.size == (32, 32)  # strength 1.0: every step
    assert backend._loaded.details["unet_in_channels"] == 9
    assert backend.capabilities().to_dict()["modes"] == ["inpaint"]
