"""Serving stored outputs."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from imagegen.api.deps import ServicesDep
from imagegen.api.schemas import ErrorResponse

router = APIRouter(tags=["images"])


@router.get(
    "/api/images/{name}",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}, 404: {"model": ErrorResponse}},
)
def get_image(name: str, services: ServicesDep) -> FileResponse:
    """A stored image, by the name the service gave it."""
    path = services.outputs.resolve(name)
    return FileResponse(
        path,
        media_type=services.outputs.mime_type(path),
        content_disposition_type="inline",
        filename=path.name,
        # Names are never reused: an output can be cached for good.
        headers={"Cache-Control": "private, max-age=31536000, immutable"},
    )
