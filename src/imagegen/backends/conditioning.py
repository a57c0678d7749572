"""What a backend gives its model besides the prompt: the request's input images, read from the input
store and fitted to the output size (the init image and its mask) or kept as they are (references).

Shared by the local pipelines and the BFL backend; pure Pillow (no torch), so it runs wherever the
request runs (the input store is a folder of SD_DATA_DIR).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from imagegen.generation import GenerationRequest, ResizeMode
from imagegen.storage.inputs import InputStore

if TYPE_CHECKING:
    from PIL.Image import Image

#: The colour "fill" pads an init image with; its mask is padded white (the new border is painted).
PAD_COLOR = (127, 127, 127)


def fit(image: Image, width: int, height: int, resize_mode: ResizeMode, *, pad: int | tuple[int, int, int]) -> Image:
    """`image` at width x height: stretched (resize), scaled to cover and centre-cropped (crop), or
    scaled to fit and padded with `pad` (fill). An image already that size is returned as it is."""
    from PIL import Image as PILImage
    from PIL import ImageOps

    if image.size == (width, height):
        return image
    resample = PILImage.Resampling.LANCZOS
    if resize_mode == "crop":
        return ImageOps.fit(image, (width, height), method=resample)
    if resize_mode == "fill":
        return ImageOps.pad(image, (width, height), method=resample, color=pad)
    return image.resize((width, height), resample)


@dataclass
class Conditioning:
    """The images of one request, ready for a pipeline call."""

    #: img2img and inpaint: the init image at the output size (RGB).
    init: Image | None = None
    #: inpaint: white = repaint, at the output size (L).
    mask: Image | None = None
    #: edit: the reference images as uploaded (RGB); the model scales them itself.
    references: list[Image] = field(default_factory=list)


def load(store: InputStore, request: GenerationRequest) -> Conditioning:
    """Read the request's inputs from the store (InputMissingError when one was removed since)."""
    if request.mode == "edit":
        return Conditioning(references=[store.open(ref).convert("RGB") for ref in request.images])
    if request.mode not in ("img2img", "inpaint"):
        return Conditioning()
    width, height = request.width, request.height
    init = fit(store.open(request.images[0]).convert("RGB"), width, height, request.resize_mode, pad=PAD_COLOR)
    mask = None
    if request.mask is not None:
        mask = fit(store.open(request.mask).convert("L"), width, height, request.resize_mode, pad=255)
    return Conditioning(init=init, mask=mask)
