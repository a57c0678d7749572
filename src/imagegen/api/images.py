"""Stored outputs: list, serve, delete."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse

from imagegen import metrics
from imagegen.api.deps import ServicesDep, base_url
from imagegen.api.presenters import iso
from imagegen.api.schemas import ErrorResponse, StoredImageList
from imagegen.storage import catalog
from imagegen.storage.outputs import MIME_BY_EXTENSION, NAME_PATTERN

router = APIRouter(tags=["images"])
log = logging.getLogger("imagegen.api")


@router.get("/api/images", response_model=StoredImageList, responses={401: {"model": ErrorResponse}})
def list_images(
    request: Request,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: Annotated[
        str | None, Query(pattern=NAME_PATTERN.pattern, description="Only images older than this name (paging).")
    ] = None,
    include_metadata: Annotated[bool, Query(description="Read each file's embedded parameters.")] = True,
) -> dict[str, Any]:
    """Stored images, newest first, with the parameters embedded in each file."""
    root = services.outputs.root
    files, next_before = catalog.page(root, limit=limit, before=before)
    base = base_url(request, services.settings)
    listed = []
    for item in files:
        embedded = catalog.read_metadata(root, item.name) if include_metadata else None
        listed.append(
            {
                "name": item.name,
                "url": f"{base}/api/images/{item.name}",
                "mime_type": MIME_BY_EXTENSION[item.name.rsplit(".", 1)[1]],
                "size_bytes": item.size,
                "created_at": iso(item.mtime),
                "metadata": (embedded or {}).get("imagegen"),
                "parameters": (embedded or {}).get("parameters"),
            }
        )
    return {"images": listed, "next_before": next_before}


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


@router.delete(
    "/api/images/{name}",
    status_code=204,
    response_class=Response,
    responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
)
def delete_image(name: str, services: ServicesDep) -> Response:
    """Delete a stored image (the job record stays; its image data then reads as null)."""
    size = catalog.delete(services.outputs.root, name)
    metrics.record_outputs_deleted("request", 1, size)
    log.info("deleted output %s (%d bytes)", name, size)
    return Response(status_code=204)
