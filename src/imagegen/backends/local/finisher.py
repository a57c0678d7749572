"""A batch's images from the pipeline's output to PIL images, in two parts, so that the device never
waits for the CPU (docs/architecture.md, request flow):

- on the device thread (`to_host`): the decoded images stay tensors on the device
  (`output_type="pt"`); the NaN check, the uint8 conversion (NHWC) and the all-black flags are
  torch ops there, read back with one small sync (the flags); the safety checker, a model on the
  device, runs there too; then the pixels are copied to pinned host memory with `non_blocking=True`
  and a CUDA event is recorded after the copy (on CPU and MPS: the same code, without pinning or
  event). Once that is queued the device thread is free for the next batch.
- on the finisher thread (base.finisher_executor, one thread "imagegen-finisher"): wait for the event,
  numpy -> PIL and the split into GeneratedImage (LocalPipelineBackend._finish). Host memory only:
  the finisher needs no pipeline, so an unload or a model switch while a batch finishes loses nothing.

A pipeline that returns host float arrays (N, H, W, 3) (the test doubles and the bench) has nothing to
copy: its NaN check and safety check run on the device thread as before, its uint8 conversion and
all-black check in the finisher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imagegen.errors import GenerationFailedError

NAN_MESSAGE = "the model produced invalid (NaN) pixels; on CUDA this usually means an unsuitable dtype"
BLACK_MESSAGE = "the model produced an all-black image"


@dataclass
class HostImages:
    """A batch's images handed from the device thread to the finisher: host memory only."""

    #: uint8 (N, H, W, 3) pixels: a CPU torch tensor (pinned and maybe still being copied into on CUDA)
    pixels: Any = None
    #: host float images (N, H, W, 3) in [0, 1] still to convert (a pipeline that returned numpy)
    floats: Any = None
    #: per image: flagged by the safety checker (no pixels are delivered for it)
    nsfw: tuple[bool, ...] = ()
    #: the CUDA event recorded after the copy to `pixels`; None: the copy is done
    event: Any = None

    def wait(self) -> Any:
        """The uint8 (N, H, W, 3) numpy pixels, once the copy has landed (finisher thread)."""
        if self.event is not None:
            self.event.synchronize()  # releases the GIL while it waits
        if self.pixels is not None:
            return self.pixels.numpy()
        array = (self.floats * 255).round().clip(0, 255).astype("uint8")
        black = array.reshape(len(array), -1).max(axis=1) == 0
        if any(bool(flag) and not nsfw for flag, nsfw in zip(black, self.nsfw, strict=True)):
            raise GenerationFailedError(BLACK_MESSAGE)
        return array


def to_host(images: Any, safety: Any) -> HostImages:
    """The device thread's part (see the module docstring). Raises for NaN pixels and for an all-black
    image the safety checker did not flag (a flagged image is black on purpose in SD 1.x)."""
    import numpy as np

    if isinstance(images, np.ndarray):  # host floats already
        if not np.isfinite(images).all():
            raise GenerationFailedError(NAN_MESSAGE)
        nsfw = tuple(bool(flag) for flag in safety.check(images)) if safety is not None else (False,) * len(images)
        return HostImages(floats=images, nsfw=nsfw)
    import torch

    with torch.inference_mode():
        # float() as diffusers' numpy output does (pt_to_numpy): the same values as that path, exactly.
        images = images.float()
        count = len(images)
        pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        finite = torch.isfinite(images).all().reshape(1)
        black = pixels.reshape(count, -1).amax(dim=1) == 0
        flags = torch.cat([finite, black]).cpu().tolist()  # the one small sync
        if not flags[0]:
            raise GenerationFailedError(NAN_MESSAGE)
        nsfw = (False,) * count
        if safety is not None:
            # A model on the device: it stays on the device thread (its CLIP preprocessing is CPU work).
            nsfw = tuple(bool(flag) for flag in safety.check(images.permute(0, 2, 3, 1).cpu().numpy()))
        if any(flag and not flagged for flag, flagged in zip(flags[1:], nsfw, strict=True)):
            raise GenerationFailedError(BLACK_MESSAGE)
        if pixels.device.type == "cuda":
            host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            cuda: Any = torch.cuda  # its Event is untyped
            event = cuda.Event()
            event.record()
            return HostImages(pixels=host, nsfw=nsfw, event=event)
        return HostImages(pixels=pixels.cpu(), nsfw=nsfw)
