"""What a request costs on this device, from the step times measured here: the engine refuses up front
(422 `deadline_unreachable`) a request that could not finish within SD_JOB_TIMEOUT, and merges no
more queued jobs into one pipeline call than fit in it.

The model (docs/operations.md, "Deadlines"): a denoising step costs time in proportion to the pixels
it computes,

    seconds ~ rate x width x height x images x steps

where `rate` (seconds per pixel-step) is the fastest measured on this device for the backend and
model over its last 32 batches: the time between a batch's first and last step reports, divided by
the steps between them and by its pixels x images. It leaves out what is paid once per call (text
encoding, VAE decode, the safety checker, a model load) and attention's faster-than-linear growth at
large sizes, and it takes the best rate seen: the estimate is below the real cost, so a refusal
means the request really could not finish. With no measurement yet for a backend and model (a
fresh start, a model never run), every request is admitted.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from imagegen.generation import GenerationRequest

#: Measurements kept per (backend, model).
KEEP = 32


@dataclass(frozen=True)
class Estimate:
    seconds: float
    #: seconds per pixel-step (the fastest measured)
    rate: float
    #: batches the rate was chosen from
    samples: int


class CostModel:
    def __init__(self) -> None:
        self._rates: dict[tuple[str, str], deque[float]] = {}

    def observe(self, backend: str, model: str, pixel_images: int, steps: int, seconds: float) -> None:
        """`steps` denoising steps of `pixel_images` (width x height x images) took `seconds`."""
        if steps < 1 or pixel_images < 1 or seconds <= 0:
            return
        self._rates.setdefault((backend, model), deque(maxlen=KEEP)).append(seconds / (steps * pixel_images))

    def estimate(self, request: GenerationRequest, images: int | None = None) -> Estimate | None:
        """The least time the request's denoising takes here (with `images` instead of its own
        number); None when nothing was measured yet for its backend and model, or it has no steps."""
        rates = self._rates.get((request.backend, request.model))
        steps = request.denoising_steps  # img2img and inpaint run int(steps x strength) of them
        if not rates or not steps:
            return None
        rate = min(rates)
        count = request.num_images if images is None else images
        return Estimate(rate * request.width * request.height * count * steps, rate, len(rates))

    def images_within(self, request: GenerationRequest, seconds: float) -> int | None:
        """How many images of the request's size and steps fit in `seconds` here (None: unknown)."""
        estimate = self.estimate(request, images=1)
        if estimate is None or estimate.seconds <= 0:
            return None
        return math.floor(seconds / estimate.seconds)
