"""Which API dialect a path speaks, and how each dialect shapes an error.

The service answers three dialects: the native API (`{"error": {"type", "message", "param",
"request_id"}}`), the OpenAI Images API under /v1/ (`{"error": {"message", "type", "param", "code"}}`)
and the AUTOMATIC1111 API under /sdapi/ (`{"error", "detail", "errors"}` strings, as A1111's own
exception handler answers). The dialect is decided by path prefix alone, so the middleware that
answers before routing (401, 413, 415) speaks the caller's dialect too.
"""

from __future__ import annotations

import enum
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
}


def _openai_type(status: int) -> str:
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
        status = _OPENAI_STATUS.get(status, status)
        code = _OPENAI_CODES.get(error_type, error_type)
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


def www_authenticate(path: str | None) -> bytes:
    """The challenge of a 401: A1111 clients speak Basic (`--api-auth user:pass`), the others Bearer."""
    if dialect_of(path) is Dialect.A1111:
        return b'Basic realm="imagegen"'
    return b'Bearer realm="imagegen"'
