"""Live previews: what one costs the device, and what they cost a generation.

Run alone with `python -m bench previews` (on whatever device SD_DEVICE=auto picks: this machine's CPU
under `make bench`, a GPU where there is one). Three figures:

1. One preview (LatentPreviewer.render: the matrix product on the device, the copy to the host, the
   JPEG encode) for the latent shapes of real models: SD at 512x512 (4x64x64), SDXL at 1024x1024
   (4x128x128), FLUX.2 at 1024x1024 (64x64 tokens of 128 features). Median of 50, after a warm-up.
2. The share of the device's time previews take at the default SD_PREVIEW_INTERVAL: at most one
   preview per interval, so at most (one preview) / (interval), whatever the step rate. Target < 3%.
3. Measured on `make demo`'s pipeline (tiny-sd-512, 512x512, 25 steps, through
   LocalPipelineBackend.generate): the share of the denoising loop spent making previews, at the default
   interval and with a preview after every step (the worst case, no throttle), inside each run (so that
   a busy machine slows both sides alike); median of 5 runs, interleaved with runs without previews.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

#: (name, latent layout, latent shape of one image, image width and height)
SHAPES = (
    ("sd 512x512", "sd", (1, 4, 64, 64), 512),
    ("sdxl 1024x1024", "sd", (1, 4, 128, 128), 1024),
    ("flux.2 1024x1024", "flux2", (1, 4096, 128), 1024),
)
STEPS = 25
RUNS = 5


def _render_ms(device: str) -> list[tuple[str, float]]:
    import torch

    from imagegen.backends.local.previews import LatentPreviewer

    measured = []
    for name, layout, shape, side in SHAPES:
        features = shape[1] if layout == "sd" else shape[2]
        previewer = LatentPreviewer(layout, torch.randn(features, 3) * 0.1, torch.full((3,), 0.5), 8, 1.0)
        latents = torch.randn(shape, device=device, dtype=torch.float16 if device == "cuda" else torch.float32)
        for _ in range(3):
            previewer.render(latents, [0], side, side)
        times = []
        for _ in range(50):
            started = time.perf_counter()
            previewer.render(latents, [0], side, side)  # ends with the copy to the host: synchronous
            times.append((time.perf_counter() - started) * 1000)
        measured.append((name, statistics.median(times)))
    return measured


def _generation(backend: Any, interval: float) -> tuple[float, float]:
    """(seconds per denoising step, share of the loop spent making previews) for one 512x512 image with
    previews every `interval` s (0: none). The share is measured inside the run (the time spent in
    LatentPreviewer.render over the loop's time), so a busy machine slows both sides alike."""
    from imagegen.backends.base import RunContext
    from imagegen.backends.local.previews import LatentPreviewer
    from imagegen.generation import GenerationParams

    request = backend.resolve(GenerationParams(prompt="a lighthouse at dawn", seed=1, steps=STEPS))
    marks: list[float] = []
    spent = [0.0]
    render = LatentPreviewer.render

    def timed(self: LatentPreviewer, *args: Any, **kwargs: Any) -> list[bytes]:
        started = time.perf_counter()
        try:
            return render(self, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    ctx = RunContext(
        ["bench"],
        deadline=time.monotonic() + 600,
        on_progress=lambda step, total: marks.append(time.perf_counter()),
        on_preview=(lambda step, total, images: None) if interval > 0 else None,
        preview_interval=interval,
    )
    LatentPreviewer.render = timed  # type: ignore[method-assign]  # measuring only, restored below
    try:
        asyncio.run(backend.generate([request], ctx))
    finally:
        LatentPreviewer.render = render  # type: ignore[method-assign]
    # From the first step's end to the last's: the denoising loop alone (no text encoding, no decoding).
    loop = marks[-1] - marks[0]
    return loop / (len(marks) - 1), spent[0] / loop


def run() -> list[dict[str, Any]]:
    from imagegen.backends.local.sd import StableDiffusionBackend
    from imagegen.backends.local.support import pick_device
    from imagegen.config import Settings

    device = pick_device("auto")
    default_interval = float(Settings.model_fields["preview_interval"].default)
    rows: list[dict[str, Any]] = []
    rendered = _render_ms(device)
    for name, milliseconds in rendered:
        rows.append(
            {
                "metric": f"one preview, {name} ({device})",
                "value": milliseconds,
                "unit": "ms",
                "target": None,
                "met": None,
                "detail": "render: latents -> RGB on the device, copy to the host, JPEG; median of 50",
            }
        )
    worst = max(milliseconds for _, milliseconds in rendered)
    share = 100 * worst / (default_interval * 1000)
    rows.append(
        {
            "metric": f"device share at SD_PREVIEW_INTERVAL={default_interval:g}s",
            "value": share,
            "unit": "%",
            "target": "< 3 %",
            "met": share < 3,
            "detail": f"at most one preview per interval: the costliest shape ({worst:.2f} ms) / {default_interval:g} s",
        }
    )

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        settings = Settings(
            _env_file=None,
            model_id="tiny-sd-512",
            model_dir=root / "models",
            output_dir=root / "outputs",
            data_dir=root / "data",
            safety_checker=False,
        )
        backend = StableDiffusionBackend(settings)
        _generation(backend, 0)  # builds and loads the model, warms up
        shares: dict[float, list[float]] = {default_interval: [], 1e-6: []}
        steps: dict[float, list[float]] = {0.0: [], default_interval: [], 1e-6: []}
        for _ in range(RUNS):
            for interval in steps:
                step_seconds, share = _generation(backend, interval)
                steps[interval].append(step_seconds)
                if interval in shares:
                    shares[interval].append(share)
        backend.unload()
    measured = 100 * statistics.median(shares[default_interval])
    rows.append(
        {
            "metric": "share of the denoising loop spent on previews, default interval (demo pipeline)",
            "value": measured,
            "unit": "%",
            "target": "< 3 %",
            "met": measured < 3,
            "detail": f"tiny-sd-512 512x512, {STEPS} steps, {device}; median of {RUNS} runs; step "
            f"{1000 * min(steps[default_interval]):.1f} ms with previews, {1000 * min(steps[0.0]):.1f} ms without "
            "(fastest runs: on a shared machine these two move more than the previews do)",
        }
    )
    every = 100 * statistics.median(shares[1e-6])
    rows.append(
        {
            "metric": "share of the denoising loop spent on previews, one after every step",
            "value": every,
            "unit": "%",
            "target": None,
            "met": None,
            "detail": "the worst case, without the interval's throttle: one preview per "
            f"{1000 * min(steps[1e-6]):.1f} ms step",
        }
    )
    return rows
