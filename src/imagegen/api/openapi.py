"""The OpenAPI document says how to authenticate: the API key is checked by a middleware (before
routing, so that unknown paths are protected too), which FastAPI cannot see; this adds the three
accepted schemes and the 401 answer to every protected operation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

SCHEMES = {
    "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "BearerKey": {"type": "http", "scheme": "bearer", "description": "The API key as a bearer token."},
    "BasicKey": {"type": "http", "scheme": "basic", "description": "Any user name; the API key as password."},
}


def install_openapi(app: FastAPI, *, auth_required: bool, public_paths: Iterable[str]) -> None:
    public = set(public_paths)

    def build() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        if auth_required:
            schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(SCHEMES)
            unauthorized = {
                "description": "Missing or invalid API key",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
            }
            for path, item in schema.get("paths", {}).items():
                if path in public:
                    continue
                for operation in item.values():
                    operation["security"] = [{name: []} for name in SCHEMES]
                    operation.setdefault("responses", {}).setdefault("401", unauthorized)
        app.openapi_schema = schema
        return schema

    # FastAPI's documented way to customise the document is to replace the app's `openapi` method.
    app.openapi = build  # type: ignore[method-assign]
