"""Errors in the caller's dialect, decided by path prefix (api/dialects.py); the live-server checks,
with the real clients, are in tests/compat/test_dialect_errors.py."""

from __future__ import annotations

from collections.abc import Callable

from imagegen.api.dialects import Dialect, dialect_of, error_body, www_authenticate
from imagegen.config import Settings
from imagegen.main import create_app


def test_dialect_by_prefix() -> None:
    assert dialect_of("/v1/images/generations") is Dialect.OPENAI
    assert dialect_of("/sdapi/v1/txt2img") is Dialect.A1111
    assert dialect_of("/api/txt2img") is dialect_of("/v1") is dialect_of(None) is Dialect.NATIVE


def test_openai_envelope_and_status() -> None:
    status, body = error_body("/v1/images/generations", 422, "invalid_parameter", "size: bad", "size", "rid")
    assert status == 400  # OpenAI answers invalid parameters with 400
    assert body == {
        "error": {"message": "size: bad", "type": "invalid_request_error", "param": "size", "code": "invalid_value"}
    }
    assert (
        error_body("/v1/models", 401, "authentication_error", "m", None, None)[1]["error"]["code"] == "invalid_api_key"
    )
    assert error_body("/v1/x", 429, "queue_full", "m", None, None) == (
        429,
        {"error": {"message": "m", "type": "rate_limit_exceeded", "param": None, "code": "queue_full"}},
    )
    assert error_body("/v1/x", 503, "out_of_memory", "m", None, None)[1]["error"]["type"] == "server_error"
    assert error_body("/v1/x", 422, "content_moderated", "m", None, None) == (
        400,
        {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": "content_policy_violation"}},
    )


def test_a1111_and_native_shapes() -> None:
    status, body = error_body("/sdapi/v1/txt2img", 422, "invalid_parameter", "steps: bad", "steps", "rid")
    assert status == 422
    assert body == {
        "error": "invalid_parameter",
        "detail": "steps: bad",
        "errors": "steps: bad",
        "param": "steps",
        "request_id": "rid",
    }
    assert error_body("/api/txt2img", 422, "invalid_parameter", "m", "p", "rid") == (
        422,
        {"error": {"type": "invalid_parameter", "message": "m", "param": "p", "request_id": "rid"}},
    )
    assert www_authenticate("/sdapi/v1/options").startswith(b"Basic")
    assert www_authenticate("/v1/models").startswith(b"Bearer") and www_authenticate("/api/jobs").startswith(b"Bearer")


def test_a_backend_that_is_not_configured_is_a_4xx_in_every_dialect() -> None:
    """To an OpenAI client it is an unknown model (OpenAI's own 404 model_not_found, which its SDKs do
    not retry); the native and A1111 dialects answer their 422 with the type."""
    assert error_body("/v1/images/generations", 422, "backend_not_configured", "m", "model", None) == (
        404,
        {"error": {"message": "m", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}},
    )
    assert error_body("/api/jobs", 422, "backend_not_configured", "m", "backend", None)[0] == 422
    status, body = error_body("/sdapi/v1/txt2img", 422, "backend_not_configured", "m", "p", None)
    assert status == 422 and body["error"] == "backend_not_configured"


def test_the_openapi_document_says_which_status_a_backend_that_is_not_configured_gets(
    make_settings: Callable[..., Settings],
) -> None:
    paths = create_app(make_settings()).openapi()["paths"]
    for path in ("/api/txt2img", "/api/jobs", "/sdapi/v1/txt2img"):
        assert "backend_not_configured" in paths[path]["post"]["responses"]["422"]["description"]
        assert "retry later" in paths[path]["post"]["responses"]["503"]["description"]
    assert "model_not_found" in paths["/v1/images/generations"]["post"]["responses"]["404"]["description"]
