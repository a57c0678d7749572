"""From the images a request carries (base64, `data:` URLs or multipart files) to references into the
input store, for every dialect: count checked first, each image decoded safely (storage/image_decoding.py)
under the name of the field it came in, the mask read by the dialect's own convention, everything stored
once by content hash (storage/inputs.py). CPU work: routes run `prepare` in a worker thread."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imagegen.config import Settings
from imagegen.errors import InvalidParameterError
from imagegen.generation import InputImage
from imagegen.storage.image_decoding import DecodedImage, decode_base64, decode_image, flatten, mask_from_paint
from imagegen.storage.inputs import InputStore

if TYPE_CHECKING:
    from PIL.Image import Image

#: How a dialect reads its mask: the native API and A1111 paint white (or opaque) where to repaint,
#: OpenAI leaves transparent where to edit.
MaskRule = Callable[[DecodedImage], "Image"]


@dataclass(frozen=True)
class Upload:
    """One uploaded image: the field it came in (for error messages) and its bytes."""

    param: str
    data: bytes


@dataclass(frozen=True)
class StoredInputs:
    images: tuple[InputImage, ...] = ()
    mask: InputImage | None = None


def from_base64(values: Sequence[str], param: str) -> list[Upload]:
    """`images[0]`, `images[1]`... from base64 strings or data: URLs (never URLs to fetch)."""
    return [
        Upload(f"{param}[{index}]", decode_base64(value, param=f"{param}[{index}]"))
        for index, value in enumerate(values)
    ]


def check_count(count: int, settings: Settings, param: str = "images") -> None:
    """Before anything is decoded: at most SD_MAX_INPUT_IMAGES images."""
    if count > settings.max_input_images:
        raise InvalidParameterError(
            f"at most {settings.max_input_images} input images per request (SD_MAX_INPUT_IMAGES)", param=param
        )


def prepare(
    store: InputStore,
    settings: Settings,
    images: Sequence[Upload],
    mask: Upload | None = None,
    *,
    mask_rule: MaskRule = mask_from_paint,
    implicit_mask: Callable[[DecodedImage], Image | None] | None = None,
) -> StoredInputs:
    """Decode, check and store a request's images and mask. `implicit_mask` derives a mask from the first
    image when none is sent (OpenAI: its own transparent pixels)."""
    check_count(len(images), settings)
    if mask is not None and not images:
        raise InvalidParameterError("a mask needs the image it applies to", param=mask.param)
    limit = settings.max_input_pixels
    decoded = [decode_image(upload.data, param=upload.param, max_pixels=limit) for upload in images]
    mask_image: Image | None = None
    if mask is not None:
        mask_image = mask_rule(decode_image(mask.data, param=mask.param, max_pixels=limit))
        first = decoded[0]
        if mask_image.size != (first.width, first.height):
            raise InvalidParameterError(
                f"{mask.param} must be the size of {images[0].param} ({first.width}x{first.height}), "
                f"not {mask_image.width}x{mask_image.height}",
                param=mask.param,
            )
    elif implicit_mask is not None and decoded:
        mask_image = implicit_mask(decoded[0])
    refs = tuple(store.put(flatten(image)) for image in decoded)
    return StoredInputs(refs, store.put(mask_image) if mask_image is not None else None)
