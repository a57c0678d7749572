"""One error envelope for every error: `{"error": {"type", "message", "param", "request_id"}}`, and
the same errors in the OpenAI and A1111 dialects on their routes (api/dialects.py).

Validation messages name the parameter and the rule, never the value sent (pydantic would echo it).
Unexpected exceptions become a generic 500 whose details go to the log with the request id.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from imagegen.api.dialects import error_body
from imagegen.errors import NotSupportedError, ServiceError
from imagegen.logging_setup import request_id_var

log = logging.getLogger("imagegen.api")

_STATUS_TYPES = {
    400: "invalid_request",
    401: "authentication_error",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameter",
    429: "rate_limited",
}


def error_response(
    status_code: int,
    error_type: str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    path: str | None = None,
) -> JSONResponse:
    """The error in the dialect of `path` (the native envelope when None)."""
    status_code, body = error_body(path, status_code, error_type, message, param, request_id_var.get())
    return JSONResponse(body, status_code=status_code, headers=headers)


def service_error_response(error: ServiceError, path: str | None = None) -> JSONResponse:
    return error_response(error.status_code, error.error_type, error.message, error.param, error.headers, path)


def _describe_validation(error: RequestValidationError) -> tuple[int, str, str, str | None]:
    """(status, type, message, param) for the first problem; the input value is never included."""
    problems = error.errors()
    if not problems:
        return 422, "invalid_parameter", "invalid request", None
    first = problems[0]
    kind = str(first.get("type", ""))
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    if kind == "json_invalid":
        return 400, "invalid_json", "the request body is not valid JSON", None
    if kind in ("missing",) and not loc:
        return 400, "invalid_request", "a JSON request body is required", None
    if kind == "model_attributes_type" or (kind.endswith("_type") and not loc):
        return 400, "invalid_request", "the request body must be a JSON object", None
    if kind == "extra_forbidden":
        return 422, "invalid_parameter", f"unknown parameter '{param}'", param
    message = str(first.get("msg", "invalid value"))
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    return 422, "invalid_parameter", f"{param or 'body'}: {message}{more}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
        if error.status_code >= 500 and not isinstance(error, NotSupportedError):  # 501: a client's probe
            log.warning(
                "%s %s -> %d %s: %s",
                request.method,
                request.url.path,
                error.status_code,
                error.error_type,
                error.message,
            )
        return service_error_response(error, request.scope["path"])

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        status, error_type, message, param = _describe_validation(error)
        return error_response(status, error_type, message, param, path=request.scope["path"])

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        error_type = _STATUS_TYPES.get(error.status_code, "error")
        message = error.detail if isinstance(error.detail, str) else "request failed"
        headers = dict(getattr(error, "headers", None) or {})
        if error.status_code == 404:
            message = "not found"
        if error.status_code == 405:
            from imagegen.api.middleware import allowed_methods

            # Starlette names only the first matching route's methods; list them all.
            methods = allowed_methods(request.scope)
            if methods:
                headers["Allow"] = ", ".join(methods)
        return error_response(
            error.status_code, error_type, message, headers=headers or None, path=request.scope["path"]
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            500,
            "internal_error",
            "internal error; the service log has the details for this request id",
            path=request.scope["path"],
        )
