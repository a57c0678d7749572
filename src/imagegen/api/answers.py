"""Answers that carry images: JSON of several MB built from orjson bytes off the event loop.

A 1024x1024 PNG is about 3 MB, 4 MB in base64: `json.dumps` of that on the event loop held every other
request for tens of milliseconds. Here the whole body (the presenter's work, base64 by pybase64, the
response model's checks where the route declares one, and orjson's serialisation) is built in a worker
thread, and the route answers the bytes. The JSON means the same as what FastAPI would have written
(the same response model, the same keys and values; orjson writes it compact, as Starlette does).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from fastapi import Response
from pydantic import BaseModel

JSON = "application/json"


def json_bytes(content: Any) -> bytes:
    """The content as compact JSON (orjson: about 10x json.dumps on multi-MB base64 strings)."""
    return orjson.dumps(content)


def through_model(model: type[BaseModel], content: Any, *, exclude_none: bool = False) -> Any:
    """What FastAPI sends for a route's `response_model` (validated, then dumped as JSON types by
    alias), for a route that answers its own bytes."""
    return model.model_validate(content).model_dump(mode="json", by_alias=True, exclude_none=exclude_none)


async def json_answer(
    build: Callable[[], Any],
    *,
    model: type[BaseModel] | None = None,
    exclude_none: bool = False,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """Build the body with `build()` (which may read files and base64 them) and serialise it, all in a
    worker thread; the response carries the bytes."""

    def render() -> bytes:
        content = build()
        if model is not None:
            content = through_model(model, content, exclude_none=exclude_none)
        return json_bytes(content)

    body = await asyncio.to_thread(render)
    return Response(body, status_code=status_code, media_type=JSON, headers=dict(headers or {}))
