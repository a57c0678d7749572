"""OpenAI Images routes this service does not offer, answered in OpenAI's error envelope (501, with
`x-should-retry: false` so that the SDKs do not retry) instead of a 404 that reads like a wrong base URL.
Image edits have their own route (issue 14); variations of an image are not offered."""

from __future__ import annotations

from fastapi import APIRouter

from imagegen.api.openai.schemas import OPENAI_ERRORS
from imagegen.errors import NotSupportedError

router = APIRouter(prefix="/v1", tags=["openai"], responses=OPENAI_ERRORS)
#: Routes that answer without reading their body (the SDK uploads the image as multipart/form-data).
UNREAD_PATHS = frozenset({"/v1/images/variations"})


# Not in the OpenAPI document: not a feature of this API, only an answer for clients that try it.
@router.post("/images/variations", include_in_schema=False)
def image_variations() -> None:
    """Not supported (501): variations of an image are not offered; use /v1/images/generations."""
    raise NotSupportedError(
        "image variations are not supported by this service: use /v1/images/generations", param="image"
    )
