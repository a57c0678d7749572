"""Safe decoding of untrusted images: the init images, masks and references callers upload.

The rules (docs/editing.md, "Safety of decoding"):
- PNG, JPEG and WebP only, recognised from the bytes themselves (never the file name or the declared
  content type: Open WebUI names every file `<uuid>.png` whatever it holds);
- width x height is read from the header and checked against SD_MAX_INPUT_PIXELS before a single pixel
  is decoded, so a decompression bomb costs a header read (Pillow's own limit only warns below ~179 MP);
- truncated or corrupt data is refused (Pillow never "repairs" it here), an animated image gives its
  first frame, EXIF orientation is applied, and every mode (grayscale, palette, 16-bit, CMYK, with or
  without alpha) becomes RGB, or RGBA where there is transparency (the caller decides what it means).
Every refusal is an InvalidParameterError naming the caller's field: a 4xx in the caller's dialect.

Pure Pillow: no torch, no I/O beyond the bytes given.
"""

from __future__ import annotations

import binascii
import hashlib
import io
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imagegen.errors import InvalidParameterError

if TYPE_CHECKING:
    from PIL.Image import Image

#: Pillow format names of what is accepted, by the magic bytes each file starts with.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.IGNORECASE)
_URL_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]{1,15}:", re.IGNORECASE)


def sniff(data: bytes) -> str | None:
    """The format the bytes are in (PNG, JPEG, WEBP), or None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_base64(text: str, *, param: str) -> bytes:
    """The bytes of a bare base64 string or a `data:` URL. A URL of any other kind is refused: images
    are never fetched from where a request points (A1111's URL fetching was an SSRF)."""
    value = text.strip()
    match = _DATA_URL.match(value)
    if match is not None:
        value = value[match.end() :]
    elif _URL_SCHEME.match(value):
        # No base64 string contains ':' (http:, https:, file:, ftp:, a data: URL without base64...).
        raise InvalidParameterError(f"{param} must be base64 or a data: URL; URLs are never fetched", param=param)
    if not value:
        raise InvalidParameterError(f"{param} is empty", param=param)
    compact = "".join(value.split())
    try:
        # Padding is optional in what some clients send; strict mode refuses other characters and
        # data after the padding (two images pasted together are not one image).
        return binascii.a2b_base64(compact + "=" * (-len(compact) % 4), strict_mode=True)
    except (binascii.Error, ValueError):
        raise InvalidParameterError(f"{param} is not valid base64", param=param) from None


@dataclass(frozen=True)
class DecodedImage:
    """An untrusted image, decoded: RGB, or RGBA when it has transparency."""

    image: Image
    source_format: str
    frames: int

    @property
    def width(self) -> int:
        return int(self.image.width)

    @property
    def height(self) -> int:
        return int(self.image.height)

    @property
    def has_alpha(self) -> bool:
        return str(self.image.mode) == "RGBA"


def _normalized(image: Image) -> Image:
    """RGB, or RGBA when the image carries transparency; 16-bit grayscale scaled, not clipped."""
    mode = str(image.mode)
    if mode in ("RGB", "RGBA"):
        return image
    if mode.startswith("I"):
        # 16-bit grayscale: scale 0..65535 to 0..255 (a plain convert would clip to white).
        return image.convert("I").point(lambda value: value * (1 / 256)).convert("L").convert("RGB")
    if mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if mode in ("PA", "LA", "La", "RGBa"):
        return image.convert("RGBA")
    return image.convert("RGB")


def decode_image(data: bytes, *, param: str, max_pixels: int) -> DecodedImage:
    """Decode untrusted bytes under the rules of this module; raise InvalidParameterError naming `param`."""
    from PIL import Image as PILImage
    from PIL import ImageOps, UnidentifiedImageError

    found = sniff(data)
    if found is None:
        raise InvalidParameterError(f"{param} must be a PNG, JPEG or WebP image", param=param)
    try:
        # open() reads the header only: the size is known before any pixel is decoded.
        image = PILImage.open(io.BytesIO(data), formats=(found,))
    except PILImage.DecompressionBombError:
        raise InvalidParameterError(
            f"{param} is larger than {max_pixels} pixels (SD_MAX_INPUT_PIXELS)", param=param
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise InvalidParameterError(f"{param} is not a valid {found} image", param=param) from None
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise InvalidParameterError(f"{param} has no pixels", param=param)
        if width * height > max_pixels:
            raise InvalidParameterError(
                f"{param} is {width}x{height}, larger than {max_pixels} pixels (SD_MAX_INPUT_PIXELS)", param=param
            )
        frames = int(getattr(image, "n_frames", 1) or 1)
        try:
            image.seek(0)  # an animated image: its first frame
            image.load()  # decodes every pixel; truncated or corrupt data raises here
            # In place: no second copy of the pixels (a 4096x4096 upload is 48 MiB already).
            ImageOps.exif_transpose(image, in_place=True)
            result = _normalized(image)
        # Pillow's decoders raise a wide range of errors on hostile data (zlib.error, struct.error,
        # IndexError, MemoryError...): every one of them means "not a valid image", never a 500.
        except Exception:  # noqa: BLE001 - see the comment above
            raise InvalidParameterError(
                f"{param} is not a valid {found} image (truncated or corrupt)", param=param
            ) from None
    return DecodedImage(result, found, frames)


def flatten(decoded: DecodedImage) -> Image:
    """The image as RGB: transparent areas over white (what most editors show them as)."""
    image = decoded.image
    if str(image.mode) != "RGBA":
        return image
    from PIL import Image as PILImage

    background = PILImage.new("RGB", image.size, (255, 255, 255))
    background.paste(image, mask=image.getchannel("A"))
    return background


def mask_from_paint(decoded: DecodedImage, *, binary: bool = False) -> Image:
    """A mask where white means repaint: an image with transparency is read by its alpha (opaque
    strokes = repaint, as A1111 reads a painted mask), any other by its brightness. `binary` rounds
    to black or white at 50% (A1111's create_binary_mask)."""
    image = decoded.image
    alpha = image.getchannel("A") if str(image.mode) == "RGBA" else None
    if alpha is not None and alpha.getextrema() != (255, 255):
        mask = alpha
    else:
        mask = image.convert("L")
    if binary:
        mask = mask.point(lambda value: 255 if value > 128 else 0)
    return mask


def mask_from_transparency(decoded: DecodedImage, *, param: str) -> Image:
    """OpenAI's convention: the transparent pixels of the mask mark the area to edit (returned white)."""
    image = decoded.image
    if str(image.mode) != "RGBA":
        raise InvalidParameterError(
            f"{param} must have an alpha channel: its transparent pixels mark the area to edit", param=param
        )
    return image.getchannel("A").point(lambda value: 255 - value)


def transparency_mask(decoded: DecodedImage) -> Image | None:
    """The edit area an image marks with its own fully transparent pixels (OpenAI's edits without a
    mask), or None when it has none."""
    if not decoded.has_alpha:
        return None
    alpha = decoded.image.getchannel("A")
    if alpha.getextrema()[0] != 0:
        return None
    return alpha.point(lambda value: 255 - value)


def pixel_digest(image: Image) -> str:
    """SHA-256 of an image's mode, size and pixels: equal pixels, equal digest (whatever file they came in)."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
