"""Live previews of a running generation: the current latents as a small JPEG, cheap enough to make
every few steps on the device.

A preview is a linear map from latent channels to RGB (what A1111 and ComfyUI call "approx" previews),
applied to the latents the pipeline's step callback receives. The map is not a table copied for each
model family: it is fitted, once per loaded pipeline, on that pipeline's own VAE. Smooth colour images
are encoded by the VAE, brought into the space the denoising loop works in (SD: scaled latents; FLUX.1:
shifted, scaled and packed in 2x2 patches; FLUX.2: patchified and batch-normalised tokens), and a ridge
regression finds the latent -> colour map. The same code serves SD 1.x/2.x, SDXL, FLUX.1, FLUX.2 and the
built-in tiny models, whatever their channel counts.

Per preview, on the device: one small matrix product over the first image of each request of the batch
(latent resolution: 64x64 for a 512 px SD image, 64x64 tokens for a 1024 px FLUX image), a copy of a few
kilobytes to the host, and a JPEG encode there. The engine limits previews to one per
SD_PREVIEW_INTERVAL seconds (RunContext.preview_due); bench/bench_previews.py measures the cost.

Everything here imports torch; call it only from a loading or generation path.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("imagegen.backends")

#: How latents are laid out in the denoising loop, per pipeline family.
SD = "sd"  # (B, C, h, w): SD 1.x/2.x, SDXL
FLUX1 = "flux1"  # (B, h/2 * w/2, C * 4): FLUX.1 packs 2x2 latent patches into tokens
FLUX2 = "flux2"  # (B, h/2 * w/2, C * 4): FLUX.2 too, after batch-normalising the patches

_JPEG_QUALITY = 80
#: Calibration: this many smooth colour images, of 16 latent pixels a side.
_CALIBRATION_IMAGES = 24
_CALIBRATION_LATENT_SIDE = 16


@dataclass(frozen=True)
class LatentPreviewer:
    """latents -> RGB for one loaded pipeline: `weights` (features, 3) and `bias` (3,), on the latents'
    device, in float32; `layout` is SD, FLUX1 or FLUX2."""

    layout: str
    weights: Any
    bias: Any
    vae_scale_factor: int
    #: R^2 of the fit on its own calibration images (how much of the colour the map explains).
    fit: float

    def render(self, latents: Any, indices: Sequence[int], width: int, height: int) -> list[bytes]:
        """JPEG bytes for the images at `indices` of a batch's latents (a request's first image each)."""
        import numpy as np
        import torch

        images = []
        with torch.no_grad():
            for index in indices:
                # A slice, not latents[indices]: advanced indexing copies, a slice is a view.
                one = latents[index : index + 1]
                if one.device.type == "cpu":
                    images.append(self._colours_on_host(one.float().numpy(), width, height))
                else:
                    images.append(self._colours_on_device(one, width, height))
        encoded = []
        for colours in images:  # (3, h, w) floats
            pixels = np.clip(colours * 255.0 + 0.5, 0, 255).astype(np.uint8)
            encoded.append(_jpeg(np.ascontiguousarray(pixels.transpose(1, 2, 0))))
        return encoded

    def _colours_on_device(self, latents: Any, width: int, height: int) -> Any:
        """(3, h, w) colours on the host, computed on the latents' device (one small copy back)."""
        import torch

        one = latents.float()
        weights = self.weights.to(one.device)
        bias = self.bias.to(one.device)
        if self.layout == SD:
            # Channels first, as the loop holds them: a permuted copy would cost more than the product.
            rgb = torch.einsum("kchw,cr->krhw", one, weights) + bias[None, :, None, None]
        else:
            rgb = (torch.matmul(self._tokens(one, width, height), weights) + bias).permute(0, 3, 1, 2)
        return rgb[0].cpu().numpy()

    def _colours_on_host(self, latents: Any, width: int, height: int) -> Any:
        """The same on CPU, in numpy's single-threaded loops: torch's CPU kernels for tensors this size
        start a thread team, which costs tens of milliseconds while the pipeline keeps the cores busy."""
        import numpy as np

        weights = self.weights.cpu().numpy()
        bias = self.bias.cpu().numpy()
        if self.layout == SD:
            return np.einsum("chw,cr->rhw", latents[0], weights) + bias[:, None, None]
        tokens = self._tokens(latents, width, height)[0]  # (h, w, features)
        return np.einsum("hwf,fr->rhw", tokens, weights) + bias[:, None, None]

    def _tokens(self, latents: Any, width: int, height: int) -> Any:
        """(k, h, w, features) from FLUX's packed tokens (k, h * w, features)."""
        count, tokens, channels = latents.shape
        rows = height // (self.vae_scale_factor * 2)
        columns = width // (self.vae_scale_factor * 2)
        if rows * columns != tokens:  # a pipeline that rounds sizes its own way: a square guess
            rows = columns = max(1, int(tokens**0.5))
            latents = latents[:, : rows * columns]
        return latents.reshape(count, rows, columns, channels)


@dataclass(frozen=True)
class BatchPreview:
    """What the step callback of one pipeline call needs to preview it: the first image of each request
    (its place in the batch) and the images' size."""

    previewer: LatentPreviewer
    indices: tuple[int, ...]
    width: int
    height: int

    @classmethod
    def of(
        cls, previewer: LatentPreviewer | None, counts: Sequence[int], width: int, height: int
    ) -> BatchPreview | None:
        """`counts`: the number of images of each request of the batch, in order."""
        if previewer is None:
            return None
        starts, offset = [], 0
        for count in counts:
            starts.append(offset)
            offset += count
        return cls(previewer, tuple(starts), width, height)

    def render(self, latents: Any) -> list[bytes]:
        """One JPEG per request of the batch."""
        return self.previewer.render(latents, self.indices, self.width, self.height)


def _jpeg(pixels: Any) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()


def _calibration_images(count: int, side: int, device: Any, dtype: Any) -> Any:
    """`count` smooth colour fields in [0, 1], (count, 3, side, side): solid primaries, greys and random
    3x3 colour grids stretched over the image (gradients in every direction)."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(0)
    solid = torch.tensor(
        [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]],
        dtype=torch.float32,
    )
    grids = torch.rand((count, 3, 3, 3), generator=generator)
    grids[: len(solid)] = solid[:, :, None, None]
    images = torch.nn.functional.interpolate(grids, size=(side, side), mode="bilinear", align_corners=True)
    return images.to(device=device, dtype=dtype)


def _patchify(latents: Any) -> Any:
    """(B, C, h, w) -> (B, h/2, w/2, C*4), features ordered as FLUX packs them (channel, row, column)."""
    count, channels, height, width = latents.shape
    patches = latents.reshape(count, channels, height // 2, 2, width // 2, 2)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(count, height // 2, width // 2, channels * 4)


def _loop_space(vae: Any, latents: Any, layout: str) -> Any:
    """VAE latents (B, C, h, w) -> what the denoising loop holds, as (B, h', w', features)."""
    import torch

    config = vae.config
    if layout == SD:
        return (latents * float(getattr(config, "scaling_factor", 1.0) or 1.0)).permute(0, 2, 3, 1)
    if layout == FLUX1:
        shift = float(getattr(config, "shift_factor", 0.0) or 0.0)
        scale = float(getattr(config, "scaling_factor", 1.0) or 1.0)
        return _patchify((latents - shift) * scale)
    # FLUX.2: patchify, then the VAE's batch norm over the patch features (the pipeline undoes it to decode).
    patches = _patchify(latents)
    mean = vae.bn.running_mean.to(patches.device, patches.dtype)
    std = torch.sqrt(vae.bn.running_var.to(patches.device, patches.dtype) + float(config.batch_norm_eps))
    return (patches - mean) / std


def calibrate(pipe: Any, layout: str) -> LatentPreviewer | None:
    """Fit the latent -> RGB map of a loaded pipeline on its own VAE; None when that is not possible
    (no VAE encoder, a failure): the pipeline then runs without previews."""
    import torch

    vae = getattr(pipe, "vae", None)
    if vae is None or not hasattr(vae, "encode"):
        return None
    try:
        factor = int(getattr(pipe, "vae_scale_factor", 0) or 2 ** (len(vae.config.block_out_channels) - 1))
        side = _CALIBRATION_LATENT_SIDE * factor
        parameter = next(vae.parameters())
        # A VAE that overflows in float16 (SDXL's) is encoded in float32, as diffusers decodes with it.
        upcast = parameter.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        dtype = torch.float32 if upcast else parameter.dtype
        if upcast:
            vae.to(torch.float32)
        try:
            with torch.no_grad():
                images = _calibration_images(_CALIBRATION_IMAGES, side, parameter.device, dtype)
                encoded = vae.encode(images * 2.0 - 1.0).latent_dist.mean
                features = _loop_space(vae, encoded, layout).float()
        finally:
            if upcast:
                vae.to(torch.float16)
        grid = features.shape[1:3]
        targets = torch.nn.functional.interpolate(images.float(), size=grid, mode="area").permute(0, 2, 3, 1)
        inputs = features.reshape(-1, features.shape[-1])
        outputs = targets.reshape(-1, 3)
        if not torch.isfinite(inputs).all():
            return None
        weights, bias, fit = _ridge(inputs, outputs)
    except Exception:  # previews are a nicety: a pipeline they cannot serve still generates (logged)
        log.warning("live previews are off for this pipeline: calibration failed", exc_info=True)
        return None
    return LatentPreviewer(layout, weights, bias, factor, fit)


def _ridge(inputs: Any, outputs: Any) -> tuple[Any, Any, float]:
    """Least squares outputs ~ inputs @ W + b with a little ridge damping; (W, b, R^2)."""
    import torch

    mean_in = inputs.mean(0)
    mean_out = outputs.mean(0)
    centred = inputs - mean_in
    gram = centred.T @ centred
    damping = 1e-3 * float(gram.diagonal().mean()) + 1e-8
    weights = torch.linalg.solve(
        gram + damping * torch.eye(gram.shape[0], device=gram.device), centred.T @ (outputs - mean_out)
    )
    bias = mean_out - mean_in @ weights
    residual = outputs - (inputs @ weights + bias)
    total = ((outputs - mean_out) ** 2).sum()
    fit = float(1.0 - (residual**2).sum() / total) if float(total) > 0 else 0.0
    return weights, bias, fit
