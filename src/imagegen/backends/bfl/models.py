"""The BFL models flux-api can call and each one's parameter rules.

Sources: BFL's API reference and its official client (black-forest-labs/flux, src/flux/api.py),
which fixes the FLUX.1 rules: sizes 256..1440 in multiples of 32, steps 1..50, guidance 1.5..5, and
no steps/guidance on flux-pro-1.1 (the table "Models and their rules" in docs/flux-api.md). Values
marked "BFL docs" were not in the API reference; they are BFL's documented defaults as far as known,
kept here in one table so that a correction is a one-line change.

Pure data and checks: no I/O, no imports beyond the standard library and our errors (whose range checks
`ImageBackend.resolve` shares).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from imagegen.errors import InvalidParameterError, require_between, require_pixels

FOUR_MP = 2048 * 2048


@dataclass(frozen=True)
class BflModelRules:
    name: str
    family: Literal["flux.2", "flux.1"]
    #: "size": the request's width/height are sent; "aspect_ratio": only their ratio is (the model picks
    #: the pixel count itself, e.g. about 4 MP for Ultra).
    size_mode: Literal["size", "aspect_ratio"]
    size_multiple: int
    min_size: int
    max_size: int
    max_pixels: int
    #: (min, max, default) or None when the endpoint takes no such field.
    steps: tuple[int, int, int] | None
    guidance: tuple[float, float, float] | None
    max_safety_tolerance: int
    #: Narrowest and widest width/height ratio accepted, for aspect_ratio models.
    ratio_range: tuple[float, float] | None = None
    #: BFL's own active-task limit for this model when lower than the account's (flux-kontext-max: 6).
    max_active: int | None = None
    #: Reference images the endpoint takes (`input_image`, `input_image_2`, ...); 0: none.
    max_references: int = 0

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "family": self.family,
            "size_mode": self.size_mode,
            "size_multiple": self.size_multiple,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "max_pixels": self.max_pixels,
            "steps": None
            if self.steps is None
            else {"min": self.steps[0], "max": self.steps[1], "default": self.steps[2]},
            "guidance": None
            if self.guidance is None
            else {"min": self.guidance[0], "max": self.guidance[1], "default": self.guidance[2]},
            "safety_tolerance": {"min": 0, "max": self.max_safety_tolerance},
        }
        if self.ratio_range is not None:
            data["aspect_ratio"] = {"min": _ratio_text(self.ratio_range[0]), "max": _ratio_text(self.ratio_range[1])}
        if self.max_active is not None:
            data["max_active_tasks"] = self.max_active
        data["max_reference_images"] = self.max_references
        return data

    @property
    def reference_fields(self) -> tuple[str, ...]:
        """`input_image`, `input_image_2`, ... up to max_references."""
        return tuple(
            "input_image" if index == 0 else f"input_image_{index + 1}" for index in range(self.max_references)
        )


def _flux2(name: str, **extra: Any) -> BflModelRules:
    # Reference: >= 64, multiples of 16, up to about 4 MP; safety_tolerance 0..5.
    values: dict[str, Any] = dict(
        family="flux.2",
        size_mode="size",
        size_multiple=16,
        min_size=64,
        max_size=4096,
        max_pixels=FOUR_MP,
        steps=None,
        guidance=None,
        max_safety_tolerance=5,
    )
    values.update(extra)
    return BflModelRules(name=name, **values)


def _flux1(name: str, **extra: Any) -> BflModelRules:
    # Reference and official client: 256..1440, multiples of 32; safety_tolerance 0..6.
    values: dict[str, Any] = dict(
        family="flux.1",
        size_mode="size",
        size_multiple=32,
        min_size=256,
        max_size=1440,
        max_pixels=1440 * 1440,
        steps=None,
        guidance=None,
        max_safety_tolerance=6,
    )
    values.update(extra)
    return BflModelRules(name=name, **values)


_WIDE = (9 / 21, 21 / 9)  # "between 21:9 and 9:21"

MODELS: dict[str, BflModelRules] = {
    rules.name: rules
    for rules in (
        # Reference images: klein input_image..input_image_4 (API reference); pro, max and flex up to
        # 8 (BFL docs); Kontext edits one input_image.
        _flux2("flux-2-klein-4b", max_references=4),
        _flux2("flux-2-klein-9b", max_references=4),
        _flux2("flux-2-pro", max_references=8),
        _flux2("flux-2-max", max_references=8),
        # BFL docs: flex takes steps 1..50 (default 50) and guidance 1.5..10 (default 4.5).
        _flux2("flux-2-flex", steps=(1, 50, 50), guidance=(1.5, 10.0, 4.5), max_references=8),
        # Kontext answers text-to-image with an aspect ratio, about 1 MP (BFL docs).
        _flux1("flux-kontext-pro", size_mode="aspect_ratio", ratio_range=_WIDE, max_references=1),
        _flux1("flux-kontext-max", size_mode="aspect_ratio", ratio_range=_WIDE, max_active=6, max_references=1),
        _flux1("flux-pro-1.1"),
        _flux1("flux-pro-1.1-ultra", size_mode="aspect_ratio", ratio_range=_WIDE),
        # BFL docs: flux-pro defaults to 40 steps, guidance 2.5; flux-dev to 28 steps, guidance 3.
        _flux1("flux-pro", steps=(1, 50, 40), guidance=(1.5, 5.0, 2.5)),
        _flux1("flux-dev", steps=(1, 50, 28), guidance=(1.5, 5.0, 3.0)),
    )
}


#: The endpoint every inpainting request (a mask) goes to, whatever FLUX model was chosen: FLUX.1 Fill
#: [pro]. It takes the image and the mask (white = repaint, the same size) and answers at the image's
#: size; steps 15..50 (default 50), guidance 1.5..100 (default 60), safety_tolerance 0..6 (BFL docs).
FILL_MODEL = "flux-pro-1.0-fill"
FILL = _flux1(FILL_MODEL, max_size=2048, max_pixels=FOUR_MP, steps=(15, 50, 50), guidance=(1.5, 100.0, 60.0))


def rules_for(model: str) -> BflModelRules:
    """The rules of a selectable model, or of the fill endpoint."""
    return FILL if model == FILL_MODEL else MODELS[model]


def _ratio_text(ratio: float) -> str:
    for height in range(1, 22):
        width = ratio * height
        if abs(width - round(width)) < 1e-6:
            return f"{round(width)}:{height}"
    return f"{ratio:.3f}"


def aspect_ratio(width: int, height: int) -> str:
    """`width:height` in lowest terms, as BFL's aspect_ratio field takes it."""
    divisor = math.gcd(width, height)
    return f"{width // divisor}:{height // divisor}"


@dataclass(frozen=True)
class ModelParameters:
    """What the per-model rules decide for one request."""

    steps: int | None
    guidance: float | None
    safety_tolerance: int
    ignored: tuple[str, ...]


def check_request(
    rules: BflModelRules,
    *,
    width: int,
    height: int,
    steps: int | None,
    guidance: float | None,
    safety_tolerance: Any,
    default_safety_tolerance: int,
    max_steps: int,
) -> ModelParameters:
    """Apply one model's rules to already service-checked values; raise InvalidParameterError naming the
    parameter (a request BFL would refuse is refused here, before any credit is spent)."""
    ignored: list[str] = []
    context = f" for BFL model '{rules.name}'"
    if rules.size_mode == "size":
        for name, value in (("width", width), ("height", height)):
            if not rules.min_size <= value <= rules.max_size or value % rules.size_multiple:
                raise InvalidParameterError(
                    f"{name} must be a multiple of {rules.size_multiple} between {rules.min_size} and "
                    f"{rules.max_size}{context}",
                    param=name,
                )
        require_pixels(width, height, rules.max_pixels, context=context)
    elif rules.ratio_range is not None:
        low, high = rules.ratio_range
        if not low - 1e-9 <= width / height <= high + 1e-9:
            raise InvalidParameterError(
                f"BFL model '{rules.name}' takes an aspect ratio (from width and height) between "
                f"{_ratio_text(low)} and {_ratio_text(high)}",
                param="width",
            )

    resolved_steps: int | None = None
    if rules.steps is None:
        if steps is not None:
            ignored.append("steps")
    else:
        low_steps, high_steps, default_steps = rules.steps
        high_steps = min(high_steps, max_steps)  # SD_MAX_STEPS may be lower than BFL's own bound
        resolved_steps = min(default_steps, high_steps) if steps is None else steps
        require_between("steps", resolved_steps, low_steps, high_steps, context=context)

    resolved_guidance: float | None = None
    if rules.guidance is None:
        if guidance is not None:
            ignored.append("guidance_scale")
    else:
        low_guidance, high_guidance, default_guidance = rules.guidance
        resolved_guidance = default_guidance if guidance is None else float(guidance)
        require_between("guidance_scale", resolved_guidance, low_guidance, high_guidance, context=context)

    if safety_tolerance is None:
        # A service-wide default above this model's ceiling is lowered to it rather than failing requests.
        tolerance = min(default_safety_tolerance, rules.max_safety_tolerance)
    else:
        if isinstance(safety_tolerance, bool) or not isinstance(safety_tolerance, int):
            raise InvalidParameterError("safety_tolerance must be an integer", param="safety_tolerance")
        tolerance = safety_tolerance
        require_between("safety_tolerance", tolerance, 0, rules.max_safety_tolerance, context=context)
    return ModelParameters(resolved_steps, resolved_guidance, tolerance, tuple(ignored))
