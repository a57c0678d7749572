"""Typed errors that carry their HTTP meaning, shared by the API, the job engine and the backends.

A route never builds an error response by hand: it raises one of these and the API layer renders the
single envelope `{"error": {"type", "message", "param", "request_id"}}`. Messages of 5xx errors are
written for the caller; details go to the log with the request id.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error the service reports to a caller."""

    status_code = 500
    error_type = "internal_error"
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.error_type, "message": self.message, "param": self.param}

    @classmethod
    def from_dict(cls, data: dict[str, Any], status_code: int) -> ServiceError:
        """Rebuild an error stored with a job (the job store keeps dicts, not exceptions)."""
        error = cls(str(data.get("message", "")), param=data.get("param"))
        error.status_code = status_code
        error.error_type = str(data.get("type", cls.error_type))
        return error


class InvalidParameterError(ServiceError):
    status_code = 422
    error_type = "invalid_parameter"


class InvalidRequestError(ServiceError):
    status_code = 400
    error_type = "invalid_request"


class UnsupportedMediaTypeError(ServiceError):
    status_code = 415
    error_type = "unsupported_media_type"


class PayloadTooLargeError(ServiceError):
    status_code = 413
    error_type = "payload_too_large"


class AuthenticationError(ServiceError):
    status_code = 401
    error_type = "authentication_error"


class NotFoundError(ServiceError):
    status_code = 404
    error_type = "not_found"


class ConflictError(ServiceError):
    status_code = 409
    error_type = "conflict"


class ContentModeratedError(ServiceError):
    status_code = 422
    error_type = "content_moderated"


class PaymentRequiredError(ServiceError):
    status_code = 402
    error_type = "payment_required"


class QueueFullError(ServiceError):
    status_code = 429
    error_type = "queue_full"
    retryable = True

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class BackendUnavailableError(ServiceError):
    """The backend cannot serve now: not configured, still loading, failed to load, or misconfigured."""

    status_code = 503
    error_type = "backend_unavailable"
    retryable = True


class OutOfMemoryError(ServiceError):
    status_code = 503
    error_type = "out_of_memory"
    retryable = True


class UpstreamError(ServiceError):
    status_code = 502
    error_type = "upstream_error"
    retryable = True


class ServiceDrainingError(ServiceError):
    status_code = 503
    error_type = "shutting_down"
    retryable = True


class DeadlineExceededError(ServiceError):
    status_code = 504
    error_type = "deadline_exceeded"
    retryable = True


class JobCancelledError(ServiceError):
    # 499 is nginx's "client closed request"; a cancelled job never reaches a connected caller
    # except through the job API, where it is a state, not an error.
    status_code = 409
    error_type = "cancelled"


class GenerationFailedError(ServiceError):
    """The pipeline produced no usable image (NaN or black output, an unexpected library error)."""

    status_code = 500
    error_type = "generation_failed"
