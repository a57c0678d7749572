"""Each dialect's request becomes GenerationParams the same way (api/translation.py): `target(registry)`
names the backend and model, `request_defaults` gives the server's defaults for them, and
`to_params(defaults)` applies the dialect's own rules. Unit tests: real request models, real backends
in a real registry (the fake, the sd backend on tiny-sd, flux-api without a key), no server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from imagegen.api.a1111.schemas import CHECKPOINT_PARAM, A1111Txt2ImgRequest
from imagegen.api.openai.schemas import ImageGenerationRequest
from imagegen.api.schemas import Txt2ImgRequest
from imagegen.api.translation import RequestDefaults, Target, defaults_for, request_defaults
from imagegen.backends.base import Capabilities
from imagegen.backends.registry import BackendRegistry
from imagegen.config import Settings
from imagegen.errors import InvalidParameterError
from imagegen.generation import GenerationParams
from tests.support.fake_backend import FakeBackend

CAPS = Capabilities(
    models=("m1", "m2"),
    default_width=512,
    default_height=512,
    size_multiple=8,
    min_size=64,
    max_width=2048,
    max_height=2048,
    max_pixels=2048 * 2048,
    default_steps=30,
    max_steps=200,
    max_batch=4,
    schedulers=("default", "euler", "euler_a", "dpmpp_2m_karras"),
    default_scheduler="default",
)
DEFAULTS = RequestDefaults(backend="b", model="m1", capabilities=CAPS, max_steps=40, max_images=8)
NO_SCHEDULERS = replace(DEFAULTS, capabilities=replace(CAPS, schedulers=(), default_scheduler=None))
NO_STEPS = replace(DEFAULTS, capabilities=replace(CAPS, default_steps=None))


def params(**values: object) -> GenerationParams:
    return GenerationParams.model_validate({"prompt": "a fox", **values})


# -- native: the parameters as sent ------------------------------------------------------------------


def test_native_passes_its_parameters_through_and_names_the_model() -> None:
    body = Txt2ImgRequest(prompt="a fox", steps=3, seed=9, num_images=2, scheduler="euler", safety_tolerance=2)
    assert body.to_params(DEFAULTS) == params(
        steps=3, seed=9, num_images=2, scheduler="euler", model="m1", backend_options={"safety_tolerance": 2}
    )
    # Absent values stay absent: the backend's own defaults fill them when it resolves the request.
    assert body.model_copy(update={"steps": None}).to_params(DEFAULTS).steps is None
    assert Txt2ImgRequest(prompt="a fox").to_params(DEFAULTS, output_format="jpeg").output_format == "jpeg"


# -- A1111: batches, samplers, what is ignored ---------------------------------------------------------


def test_a1111_fields_map_onto_the_native_parameters() -> None:
    body = A1111Txt2ImgRequest(
        prompt="a fox", negative_prompt="", seed=None, cfg_scale=6, batch_size=2, n_iter=3, steps=12
    )
    assert body.to_params(DEFAULTS) == params(
        negative_prompt=None,
        seed=-1,
        guidance_scale=6.0,
        num_images=6,
        steps=12,
        scheduler="default",
        output_format="png",
        model="m1",
    )
    assert body.ignored(DEFAULTS) == []


def test_a1111_batch_size_times_n_iter_is_limited_by_the_defaults() -> None:
    body = A1111Txt2ImgRequest(prompt="x", batch_size=3, n_iter=3)
    with pytest.raises(InvalidParameterError) as raised:
        body.to_params(DEFAULTS)
    assert raised.value.param == "batch_size" and "at most 8 (SD_MAX_IMAGES)" in raised.value.message
    assert body.to_params(replace(DEFAULTS, max_images=9)).num_images == 9


@pytest.mark.parametrize(
    ("sampler", "schedule", "scheduler", "ignored"),
    [
        ("Euler a", None, "euler_a", []),
        ("DPM++ 2M", "karras", "dpmpp_2m_karras", []),
        ("DPM++ 2M Karras", None, "dpmpp_2m_karras", []),
        # Offered by the sampler table but not by this model: its own scheduler runs, reported.
        ("DDIM", None, "default", ["sampler_name"]),
        ("Euler a", "karras", "euler_a", ["scheduler"]),  # no Karras variant of Euler a in diffusers
        ("Euler", "exponential", "euler", ["scheduler"]),
    ],
)
def test_a1111_samplers_become_the_schedulers_the_model_offers(
    sampler: str, schedule: str | None, scheduler: str, ignored: list[str]
) -> None:
    body = A1111Txt2ImgRequest(prompt="x", sampler_name=sampler, scheduler=schedule)
    assert body.to_params(DEFAULTS).scheduler == scheduler
    assert body.ignored(DEFAULTS) == ignored


def test_a1111_sampler_fallback_depends_on_what_the_defaults_offer() -> None:
    body = A1111Txt2ImgRequest(prompt="x", sampler_name="DDIM")
    offered_first = replace(DEFAULTS, capabilities=replace(CAPS, schedulers=("euler", "ddim_x")))
    assert body.to_params(offered_first).scheduler == "euler"  # no "default": the first offered
    # A model without schedulers keeps the mapped name; its backend reports it as ignored.
    assert body.to_params(NO_SCHEDULERS).scheduler == "ddim" and body.ignored(NO_SCHEDULERS) == []


def test_a1111_reports_the_features_it_does_not_have() -> None:
    body = A1111Txt2ImgRequest(
        prompt="x",
        enable_hr=True,
        styles=["s"],
        sampler_name="DDIM",
        override_settings={"sd_model_checkpoint": "m1", "CLIP_stop_at_last_layers": 2},
    )
    assert body.ignored(DEFAULTS) == [
        "sampler_name",
        "enable_hr",
        "styles",
        "override_settings.CLIP_stop_at_last_layers",
    ]
    with pytest.raises(InvalidParameterError) as raised:
        A1111Txt2ImgRequest(prompt="x", sampler_name="nope").to_params(DEFAULTS)
    assert raised.value.param == "sampler_name"


# -- OpenAI: size, quality, n -------------------------------------------------------------------------


def test_openai_fields_map_onto_the_native_parameters() -> None:
    body = ImageGenerationRequest(prompt="a fox", size="512x768", n=3, output_format="webp", seed=4)
    assert body.to_params(DEFAULTS) == params(
        width=512, height=768, num_images=3, output_format="webp", seed=4, model="m1"
    )
    auto = ImageGenerationRequest(prompt="a fox", size="auto").to_params(DEFAULTS)
    assert (auto.width, auto.height, auto.num_images, auto.output_format) == (None, None, 1, "png")


@pytest.mark.parametrize(
    ("quality", "steps", "defaults", "expected"),
    [
        ("low", None, DEFAULTS, 15),  # half the model's 30
        ("hd", None, DEFAULTS, 40),  # 1.5 x 30 = 45, capped at the defaults' max_steps
        ("high", None, replace(DEFAULTS, max_steps=100), 45),
        ("standard", None, DEFAULTS, None),  # the model's default, left to the backend
        ("hd", 100, DEFAULTS, 100),  # explicit steps win (and the backend checks them)
        ("hd", None, NO_STEPS, None),  # a model without steps (flux-api) gets none
    ],
)
def test_openai_quality_becomes_steps_within_the_limits(
    quality: str, steps: int | None, defaults: RequestDefaults, expected: int | None
) -> None:
    body = ImageGenerationRequest.model_validate({"prompt": "x", "quality": quality, "steps": steps})
    assert body.to_params(defaults).steps == expected


@pytest.mark.parametrize(("body", "param"), [({"stream": True}, "stream"), ({"size": "big"}, "size")])
def test_openai_refusals_name_openai_parameters(body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidParameterError) as raised:
        ImageGenerationRequest.model_validate({"prompt": "x", **body}).to_params(DEFAULTS)
    assert raised.value.param == param


# -- targets and the server's defaults ----------------------------------------------------------------


@pytest.fixture
def registry(make_settings: Callable[..., Settings]) -> BackendRegistry:
    """fake (default), other (a second fake), sd (tiny-sd, tiny-sdxl), flux-local, flux-api (no key)."""
    return BackendRegistry.from_settings(
        make_settings(models=["tiny-sdxl"], max_steps=60, max_images=5),
        {"fake": FakeBackend, "other": lambda s: FakeBackend(s, backend_id="other", default_steps=7)},
        default_id="fake",
    )


def test_each_dialect_names_its_target(registry: BackendRegistry) -> None:
    sd = registry.get("sd")
    assert Txt2ImgRequest(prompt="x").target(registry) == Target(registry.default, None)
    assert Txt2ImgRequest(prompt="x", backend="sd", model="tiny-sdxl").target(registry) == Target(sd, "tiny-sdxl")
    title = A1111Txt2ImgRequest(prompt="x", override_settings={"sd_model_checkpoint": "tiny-sdxl [sd]"})
    assert title.target(registry) == Target(sd, "tiny-sdxl")
    assert A1111Txt2ImgRequest(prompt="x").target(registry) == Target(registry.default, None)
    assert ImageGenerationRequest(prompt="x", model="tiny-sdxl").target(registry) == Target(sd, "tiny-sdxl")
    assert ImageGenerationRequest(prompt="x", model="sd").target(registry) == Target(sd, "tiny-sd")
    assert ImageGenerationRequest(prompt="x", model="dall-e-3").target(registry) == Target(registry.default, None)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (Txt2ImgRequest(prompt="x", backend="dalle"), "backend"),
        (A1111Txt2ImgRequest(prompt="x", override_settings={"sd_model_checkpoint": "nope"}), CHECKPOINT_PARAM),
        (A1111Txt2ImgRequest(prompt="x", override_settings={"sd_model_checkpoint": 7}), CHECKPOINT_PARAM),
    ],
)
def test_a_target_that_does_not_exist_is_named_in_the_dialects_words(
    registry: BackendRegistry, body: Txt2ImgRequest | A1111Txt2ImgRequest, param: str
) -> None:
    with pytest.raises(InvalidParameterError) as raised:
        body.target(registry)
    assert raised.value.param == param


def test_request_defaults_come_from_the_chosen_model_and_the_settings(registry: BackendRegistry) -> None:
    sd = registry.get("sd")
    defaults = request_defaults(sd, None, registry.get("sd").settings)
    assert (defaults.backend, defaults.model) == ("sd", "tiny-sd")
    assert defaults.default_steps == 25 and defaults.max_steps == 60 and defaults.max_images == 5
    assert "dpmpp_2m_karras" in defaults.schedulers
    sdxl = request_defaults(sd, "tiny-sdxl", sd.settings)
    assert sdxl.default_steps == 30 and sdxl.capabilities.default_width == 64
    assert request_defaults(registry.get("flux-api"), None, sd.settings).default_steps is None
    with pytest.raises(InvalidParameterError) as raised:
        request_defaults(sd, "nope", sd.settings)
    assert raised.value.param == "model" and "available: tiny-sd, tiny-sdxl" in raised.value.message


def test_one_default_model_rule_for_every_dialect(registry: BackendRegistry) -> None:
    """A checkpoint picked at runtime (A1111 options) is what a request naming no model gets, in every
    dialect, and what the backend resolves it to."""
    settings = registry.get("sd").settings
    registry.set_default("sd", "tiny-sdxl")
    assert registry.get("sd").default_model_id() == "tiny-sdxl"
    for body in (Txt2ImgRequest(prompt="x"), A1111Txt2ImgRequest(prompt="x"), ImageGenerationRequest(prompt="x")):
        defaults = defaults_for(body, registry, settings)
        assert (defaults.backend, defaults.model) == ("sd", "tiny-sdxl")
        request = registry.get(defaults.backend).resolve(body.to_params(defaults))
        assert request.model == "tiny-sdxl" and request.width == 64
    assert registry.get("sd").resolve(params()).model == "tiny-sdxl"
