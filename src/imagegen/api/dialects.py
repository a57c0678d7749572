"""Which API dialect a path speaks, and how each dialect shapes an error.

The service answers three dialects: the native API (`{"error": {"type", "message", "param",
"request_id"}}`), the OpenAI Images API under /v1/ (`{"error": {"message", "type", "param", "code"}}`)
and the AUTOMATIC1111 API under /sdapi/ (`{"error", "detail", "errors"}` strings, as A1111's own
exception handler answers). The dialect is decided by path prefix alone, so the middleware that
answers before routing (401, 413, 415) speaks the caller's dialect too.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

OPENAI_PREFIX = "/v1/"
A1111_PREFIX = "/sdapi/"


class Dialect(str, enum.Enum):
    NATIVE = "native"
    OPENAI = "openai"
    A1111 = "a1111"


def dialect_of(path: str | None) -> Dialect:
    if path:
        if path.startswith(OPENAI_PREFIX):
            return Dialect.OPENAI
        if path.startswith(A1111_PREFIX):
            return Dialect.A1111
    return Dialect.NATIVE


# OpenAI answers invalid parameters with 400 (its SDKs raise BadRequestError), where the native
# API uses 422; a moderated prompt is a 400 `content_policy_violation` there.
_OPENAI_STATUS = {422: 400}
_OPENAI_CODES = {
    "authentication_error": "invalid_api_key",
    "content_moderated": "content_policy_violation",
    "invalid_parameter": "invalid_value",
    "payment_required": "insufficient_quota",
    "not_supported": "unsupported",
}
#: To an OpenAI client a backend that is not configured is a model this server does not have: the
#: answer OpenAI gives for an unknown model (404 model_not_found), which its SDKs do not retry.
_OPENAI_BY_TYPE = {"backend_not_configured": (404, "model_not_found")}


def _openai_type(status: int) -> str:
    if status == 501:
        return "invalid_request_error"  # the request asks for what this server does not offer
    if status == 401:
        return "invalid_request_error"  # what OpenAI itself answers for a wrong key (code invalid_api_key)
    if status == 402:
        return "insufficient_quota"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_exceeded"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(
    path: str | None, status: int, error_type: str, message: str, param: str | None, request_id: str | None
) -> tuple[int, dict[str, Any]]:
    """(status, body) of an error in the dialect of `path`."""
    dialect = dialect_of(path)
    if dialect is Dialect.OPENAI:
        status, code = _OPENAI_BY_TYPE.get(
            error_type, (_OPENAI_STATUS.get(status, status), _OPENAI_CODES.get(error_type, error_type))
        )
        return status, {"error": {"message": message, "type": _openai_type(status), "param": param, "code": code}}
    if dialect is Dialect.A1111:
        # A1111's handler: {"error": <exception name>, "detail": ..., "body": ..., "errors": ...}; "body"
        # (the request echoed back) is left out on purpose: bodies carry prompts and, from some
        # clients, credentials.
        return status, {
            "error": error_type,
            "detail": message,
            "errors": message,
            "param": param,
            "request_id": request_id,
        }
    return status, {"error": {"type": error_type, "message": message, "param": param, "request_id": request_id}}


#: What each error status means, for the OpenAPI document: clients decide on it whether to retry.
_MEANINGS = {
    400: "Malformed request: the body is not valid JSON or not a JSON object",
    401: "Missing or invalid API key",
    402: "Out of credits (flux-api)",
    404: "Not found",
    406: "The raw image format asked for (Accept) cannot be given",
    409: "Conflict: the job already finished",
    413: "Request body too large",
    415: "Request body is not JSON",
    422: "Invalid parameter (invalid_parameter), moderated content (content_moderated), or a backend that "
    "cannot take jobs in this installation (backend_not_configured: no key, torch missing; no retry helps)",
    429: "Queue full: retry after Retry-After seconds",
    500: "Generation failed",
    502: "Upstream (BFL) error",
    503: "Backend loading or failed to load, out of memory, the service shutting down, or in a cluster no worker "
    "for the backend (backend_unavailable) or the job queue unreachable (queue_unavailable): retry later",
    501: "Not supported by this service (a feature of the dialect it does not offer)",
    504: "Deadline exceeded",
}
_OPENAI_MEANINGS = {
    400: "Invalid parameter (invalid_value), moderated content (content_policy_violation) or malformed request",
    404: "Unknown model or route; a model whose backend is not configured is model_not_found (no retry helps)",
    422: "Not answered in this dialect: invalid parameters are 400",
}


def documented_errors(dialect: Dialect, model: type, codes: Iterable[int]) -> dict[int | str, dict[str, Any]]:
    """The `responses` a route lists for its errors: the dialect's envelope and what each status means."""
    meanings = {**_MEANINGS, **(_OPENAI_MEANINGS if dialect is Dialect.OPENAI else {})}
    return {code: {"model": model, "description": meanings[code]} for code in codes}


def www_authenticate(path: str | None) -> bytes:
    """The challenge of a 401: A1111 clients speak Basic (`--api-auth user:pass`), the others Bearer."""
    if dialect_of(path) is Dialect.A1111:
        return b'Basic realm="imagegen"'
    return b'Bearer realm="imagegen"'
