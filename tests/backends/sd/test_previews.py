"""Live previews on the torch side: the latent -> RGB map fitted on a pipeline's own VAE, for the three
latent layouts (SD, FLUX.1, FLUX.2), and the real tiny pipelines sending previews through the service.

The fit is checked where the answer is known: a VAE whose encoder is linear (colour mixing and average
pooling) is exactly invertible by a linear map, so a preview of its latents must give the image back.
The latents are laid out by diffusers' own packing functions, so the previewer reads them as the
pipelines hold them."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from imagegen.backends.local import previews
from tests.engine.test_jobs_api import submit
from tests.support.sse import read_events


class LinearVAE(torch.nn.Module):
    """An "autoencoder" whose latents are a fixed linear mix of the average colour of each patch."""

    def __init__(self, channels: int, factor: int, *, flux2: bool = False) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(channels)
        self.mix = torch.nn.Parameter(torch.randn(channels, 3, generator=generator), requires_grad=False)
        self.offset = torch.nn.Parameter(torch.randn(channels, generator=generator), requires_grad=False)
        self.factor = factor
        self.config = SimpleNamespace(
            block_out_channels=[1] * (factor.bit_length()),
            scaling_factor=0.5,
            shift_factor=0.1,
            batch_norm_eps=1e-4,
            force_upcast=False,
        )
        if flux2:
            self.bn = SimpleNamespace(
                running_mean=torch.linspace(-0.5, 0.5, channels * 4), running_var=torch.linspace(0.5, 2.0, channels * 4)
            )

    def encode(self, images: torch.Tensor) -> Any:
        colours = torch.nn.functional.avg_pool2d((images + 1) / 2, self.factor)  # back to [0, 1], pooled
        latents = torch.einsum("cr,brhw->bchw", self.mix, colours) + self.offset[None, :, None, None]
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=latents))


def _test_image(side: int) -> torch.Tensor:
    """A smooth picture in [0, 1]: (1, 3, side, side)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    return torch.stack([x, y, (1 - x) * (1 - y)])[None]


@pytest.mark.parametrize(("layout", "channels"), [(previews.SD, 4), (previews.FLUX1, 16), (previews.FLUX2, 32)])
def test_the_fitted_map_gives_a_linear_vae_its_image_back(layout: str, channels: int) -> None:
    from diffusers import Flux2KleinPipeline, FluxPipeline

    factor, side = 8, 128
    vae = LinearVAE(channels, factor, flux2=layout == previews.FLUX2)
    pipe = SimpleNamespace(vae=vae, vae_scale_factor=factor)
    previewer = previews.calibrate(pipe, layout)
    assert previewer is not None and previewer.fit > 0.999

    image = _test_image(side)
    latents = vae.encode(image * 2 - 1).latent_dist.mean  # (1, C, 16, 16)
    config = vae.config
    if layout == previews.SD:
        loop = latents * config.scaling_factor
        grid = side // factor
    elif layout == previews.FLUX1:  # what FluxPipeline holds: shifted, scaled, packed
        scaled = (latents - config.shift_factor) * config.scaling_factor
        loop = FluxPipeline._pack_latents(scaled, 1, channels, side // factor, side // factor)
        grid = side // factor // 2
    else:  # what Flux2KleinPipeline holds: patchified, batch-normalised, packed
        patches = Flux2KleinPipeline._patchify_latents(latents)
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + config.batch_norm_eps)
        loop = Flux2KleinPipeline._pack_latents((patches - mean) / std)
        grid = side // factor // 2
    batch = previews.BatchPreview.of(previewer, [1], side, side)
    assert batch is not None
    (jpeg,) = batch.render(loop)
    shown = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=float) / 255
    assert shown.shape == (grid, grid, 3)
    expected = torch.nn.functional.interpolate(image, size=(grid, grid), mode="area")[0].permute(1, 2, 0).numpy()
    assert np.abs(shown - expected).mean() < 0.03  # the image back, within JPEG's loss


def test_a_batch_previews_the_first_image_of_each_request() -> None:
    vae = LinearVAE(4, 8)
    previewer = previews.calibrate(SimpleNamespace(vae=vae, vae_scale_factor=8), previews.SD)
    assert previewer is not None
    dark, light = torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64)
    images = torch.cat([dark, dark, light])  # request 1: two images, request 2: one
    latents = vae.encode(images * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    batch = previews.BatchPreview.of(previewer, [2, 1], 64, 64)
    assert batch is not None and batch.indices == (0, 2)
    first, second = (np.asarray(Image.open(io.BytesIO(jpeg))).mean() for jpeg in batch.render(latents))
    assert first < 20 and second > 235


@pytest.mark.parametrize(
    ("backend", "settings", "size", "grid"),
    [
        ("sd", {"model_id": "tiny-sd"}, 64, 32),  # tiny VAE: factor 2
        ("flux-local", {"flux_model_id": "tiny-flux2-klein"}, 64, 16),  # and 2x2 patches
        ("flux-local", {"flux_model_id": "tiny-flux"}, 64, 16),
    ],
)
def test_the_tiny_pipelines_send_previews(
    serve: Callable[..., httpx.Client], backend: str, settings: dict[str, Any], size: int, grid: int
) -> None:
    client = serve(preview_interval=0.001, **settings)
    job = submit(client, prompt="a red fox", backend=backend, steps=6, seed=3, width=size, height=size)
    events = list(read_events(client, f"/api/jobs/{job['id']}/events?previews=true"))
    assert events[-1]["event"] == "succeeded", events[-1]
    shown = [event["data"] for event in events if event["event"] == "preview"]
    assert [preview["step"] for preview in shown] == [1, 2, 3, 4, 5]  # every step but the last, at this interval
    for preview in shown:
        image = Image.open(io.BytesIO(base64.b64decode(preview["b64"])))
        assert image.format == "JPEG" and image.size == (grid, grid)
    health = client.get("/api/backends").json()
    assert all("previewer" not in str(item) for item in health["backends"])  # nothing internal in /health
