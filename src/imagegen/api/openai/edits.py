"""OpenAI's `POST /v1/images/edits` as its clients send it: a multipart form (the `openai` SDK, Open
WebUI, n8n's OpenAI node) with the image as `image` or repeated `image[]` files and an optional `mask`
file whose transparent pixels mark the area to edit; or, for scripts, the same fields as JSON with
base64 / data: URL strings. File names and declared content types are never trusted (Open WebUI names
every file `<uuid>.png`): the bytes are sniffed (storage/image_decoding.py).

Fields without a meaning here (`background`, `input_fidelity`, `output_compression`, `user`...) are
accepted and reported in `ignored_parameters`; unknown ones too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from pydantic import Field, ValidationError
from starlette.datastructures import UploadFile

from imagegen.api.openai.schemas import ImageGenerationRequest
from imagegen.api.translation import RequestDefaults
from imagegen.api.uploads import StoredInputs, Upload
from imagegen.config import Settings
from imagegen.errors import InvalidParameterError
from imagegen.generation import GenerationParams
from imagegen.storage.image_decoding import decode_base64

#: The names an image may come under: the SDK sends `image` for one and `image[]` for several.
IMAGE_FIELDS = ("image", "image[]")
#: OpenAI's edit fields that change nothing here (reported as ignored when sent).
NO_EFFECT = ("background", "input_fidelity", "output_compression", "user", "moderation", "style", "partial_images")
_KNOWN = {
    *IMAGE_FIELDS,
    "mask",
    "prompt",
    "model",
    "n",
    "size",
    "quality",
    "response_format",
    "output_format",
    "stream",
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "strength",
    *NO_EFFECT,
    "safety_identifier",
}


class ImageEditRequest(ImageGenerationRequest):
    """The text fields of an edit (form values arrive as strings: types are lax, as OpenAI's are)."""

    strength: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False, description="Extension: img2img/inpaint strength."
    )
    input_fidelity: str | None = Field(None, max_length=32, description="Accepted, ignored.")

    def to_edit_params(self, defaults: RequestDefaults, inputs: StoredInputs) -> GenerationParams:
        return self.to_params(defaults).model_copy(
            update={"images": inputs.images, "mask": inputs.mask, "strength": self.strength}
        )


@dataclass
class EditForm:
    """What an edit request carried: its text fields validated, its image and mask bytes, what it sent
    that changes nothing here."""

    body: ImageEditRequest
    images: list[Upload]
    mask: Upload | None
    ignored: list[str] = field(default_factory=list)


def _validated(fields: dict[str, Any]) -> ImageEditRequest:
    try:
        return ImageEditRequest.model_validate(fields)
    except ValidationError as error:
        problem = error.errors(include_input=False, include_url=False)[0]
        param = ".".join(str(part) for part in problem.get("loc", ())) or None
        raise InvalidParameterError(f"{param or 'body'}: {problem.get('msg', 'invalid value')}", param=param) from None


async def _file_bytes(value: Any, param: str) -> bytes:
    if isinstance(value, UploadFile):
        return await value.read()
    if isinstance(value, str):
        return decode_base64(value, param=param)  # a data: URL or base64 string in a form field
    raise InvalidParameterError(f"{param} must be an image file", param=param)


async def read_edit(request: Request, settings: Settings) -> EditForm:
    """Parse a multipart or JSON edit request (the body guard already bounded its size)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    images: list[Upload] = []
    mask: Upload | None = None
    fields: dict[str, Any] = {}
    if content_type == "multipart/form-data":
        form = await request.form(max_files=settings.max_input_images + 1, max_fields=100)
        try:
            for name, value in form.multi_items():
                if name in IMAGE_FIELDS:
                    param = f"image[{len(images)}]"
                    images.append(Upload(param, await _file_bytes(value, param)))
                elif name == "mask":
                    mask = Upload("mask", await _file_bytes(value, "mask"))
                elif isinstance(value, str):
                    fields[name] = value
        finally:
            await form.close()
    else:
        try:
            data = await request.json()
        except ValueError:
            raise InvalidParameterError("the body must be a multipart form or JSON", param=None) from None
        if not isinstance(data, dict):
            raise InvalidParameterError("the body must be a JSON object", param=None)
        for name in IMAGE_FIELDS:
            value = data.pop(name, None)
            for item in value if isinstance(value, list) else [] if value is None else [value]:
                param = f"image[{len(images)}]"
                images.append(Upload(param, await _file_bytes(item, param)))
        if data.get("mask") is not None:
            mask = Upload("mask", await _file_bytes(data.pop("mask"), "mask"))
        fields = data
    if not images:
        raise InvalidParameterError("image is required (one file, or several as image[])", param="image")
    ignored = sorted(name for name in fields if name not in _KNOWN or name in NO_EFFECT)
    body = _validated({name: value for name, value in fields.items() if name in _KNOWN})
    return EditForm(body, images, mask, ignored)
