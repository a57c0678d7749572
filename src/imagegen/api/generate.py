"""POST /api/txt2img and POST /api/img2img: synchronous generation (a job the caller waits on)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from imagegen.api import presenters, uploads
from imagegen.api.deps import ServicesDep, base_url, request_id
from imagegen.api.dialects import Dialect, documented_errors
from imagegen.api.schemas import ErrorResponse, ImageInputFields, Img2ImgRequest, Txt2ImgRequest, Txt2ImgResponse
from imagegen.api.sync_jobs import raise_for_job, run_job
from imagegen.api.translation import defaults_for
from imagegen.config import OutputFormat
from imagegen.errors import ContentModeratedError, ServiceError
from imagegen.services import Services
from imagegen.storage.image_decoding import decode_base64

router = APIRouter(tags=["generate"])

_IMAGE_TYPES: dict[str, OutputFormat] = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/webp": "webp",
}


class NotAcceptableError(ServiceError):
    status_code = 406
    error_type = "not_acceptable"


def raw_format(accept: str | None, body: Txt2ImgRequest) -> OutputFormat | None:
    """The image format to answer with as raw bytes, or None for JSON.

    The highest-ranked media range of Accept decides (n8n's "File" response format sends image/*)."""
    if not accept:
        return None
    ranked: list[tuple[float, int, str]] = []
    for index, part in enumerate(accept.split(",")):
        media, *options = [piece.strip() for piece in part.split(";")]
        quality = 1.0
        for option in options:
            if option.startswith("q="):
                try:
                    quality = float(option[2:])
                except ValueError:
                    quality = 0.0
        if quality > 0:
            ranked.append((-quality, index, media.lower()))
    for _, _, media in sorted(ranked):
        if media in ("application/json", "*/*", "application/*"):
            return None
        wanted = body.output_format if media == "image/*" else _IMAGE_TYPES.get(media)
        if wanted is None:
            continue
        # One image whatever the image type asked for (image/* included): a second one would be dropped.
        if body.num_images != 1:
            raise NotAcceptableError(
                "a raw image response carries one image: set num_images to 1 or accept JSON", param="num_images"
            )
        if "output_format" in body.model_fields_set and body.output_format != wanted:
            raise NotAcceptableError(
                f"Accept asks for {media} but output_format is {body.output_format}", param="output_format"
            )
        return wanted
    return None


_RESPONSES = {
    200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
    **documented_errors(Dialect.NATIVE, ErrorResponse, (400, 401, 406, 413, 415, 422, 429, 502, 503, 504)),
}


async def stored_inputs(body: ImageInputFields, services: Services) -> uploads.StoredInputs | None:
    """The body's images and mask, decoded and stored in a worker thread (None: it has none)."""
    if not body.images and body.mask is None:
        return None
    uploads.check_count(len(body.images), services.settings)
    images = uploads.from_base64(body.images, "images")
    mask = None if body.mask is None else uploads.Upload("mask", decode_base64(body.mask, param="mask"))
    return await asyncio.to_thread(uploads.prepare, services.inputs, services.settings, images, mask)


@router.post("/api/txt2img", response_model=Txt2ImgResponse, responses=_RESPONSES)
async def txt2img(body: Txt2ImgRequest, request: Request, services: ServicesDep) -> Response:
    """Generate images and wait for them. With `Accept: image/png` (jpeg, webp) and one image, the raw bytes."""
    return await _generate(body, request, services, None)


@router.post("/api/img2img", response_model=Txt2ImgResponse, responses=_RESPONSES)
async def img2img(body: Img2ImgRequest, request: Request, services: ServicesDep) -> Response:
    """Generate from images and wait: img2img, inpainting (mask) or reference editing, as the model does
    (docs/editing.md); everything txt2img takes, the same answer. Body limit SD_MAX_UPLOAD_BYTES."""
    return await _generate(body, request, services, await stored_inputs(body, services))


async def _generate(
    body: Txt2ImgRequest, request: Request, services: Services, inputs: uploads.StoredInputs | None
) -> Response:
    raw = raw_format(request.headers.get("accept"), body)
    defaults = defaults_for(body, services.registry, services.settings)
    params = body.to_params(defaults, output_format=raw, inputs=inputs)
    job = await run_job(services, request, params, defaults.backend)
    raise_for_job(job)
    if raw is not None:
        image = job.result.images[0] if job.result is not None and job.result.images else None
        if image is None or image.filename is None:
            raise ContentModeratedError("the safety checker flagged the image; no content is returned")
        path = services.outputs.resolve(image.filename)
        return Response(
            content=await asyncio.to_thread(path.read_bytes),  # file I/O off the event loop
            media_type=image.mime_type,
            headers={
                "Content-Disposition": f'inline; filename="{image.filename}"',
                "X-Seed": str(image.seed),
                "X-Job-Id": job.id,
            },
        )
    # Reading and base64-encoding the images happens off the event loop (several MB for big images).
    answer = await asyncio.to_thread(
        presenters.txt2img_body, job, services.outputs, base_url(request, services.settings), request_id(request)
    )
    return JSONResponse(answer)
