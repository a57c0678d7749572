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
        if data.get("retry_after") is not None:
            error.headers = {"Retry-After": str(data["retry_after"])}
        error.status_code = status_code
        error.error_type = str(data.get("type", cls.error_type))
        return error


class InvalidParameterError(ServiceError):
    status_code = 422
    error_type = "invalid_parameter"


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

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class BackendUnavailableError(ServiceError):
    """The backend cannot serve now: not configured, still loading, failed to load, or misconfigured."""

    status_code = 503
    error_type = "backend_unavailable"


class OutOfMemoryError(ServiceError):
    status_code = 503
    error_type = "out_of_memory"


class UpstreamError(ServiceError):
    status_code = 502
    error_type = "upstream_error"


class ServiceDrainingError(ServiceError):
    status_code = 503
    error_type = "shutting_down"


class DeadlineExceededError(ServiceError):
    status_code = 504
    error_type = "deadline_exceeded"


class DeadlineUnreachableError(InvalidParameterError):
    """Refused up front: the request's estimated cost on this device exceeds the job deadline."""

    error_type = "deadline_unreachable"


class QueueTimeoutError(ServiceError):
    """The job waited in the queue longer than SD_QUEUE_TIMEOUT without getting the device."""

    status_code = 503
    error_type = "queue_timeout"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class JobCancelledError(ServiceError):
    # 499 is nginx's "client closed request"; a cancelled job never reaches a connected caller
    # except through the job API, where it is a state, not an error.
    status_code = 409
    error_type = "cancelled"


class GenerationFailedError(ServiceError):
    """The pipeline produced no usable image (NaN or black output, an unexpected library error)."""

    status_code = 500
    error_type = "generation_failed"
