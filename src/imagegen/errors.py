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
    #: What the raise site knew about the cause, for a metric's label (e.g. the BFL error kinds of
    #: `imagegen_bfl_errors_total`); never shown to callers.
    cause_kind: str | None = None

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


class BackendNotConfiguredError(ServiceError):
    """The backend cannot take jobs in this installation (no BFL key, torch not installed): only the
    operator can change that, so it is a 4xx that no retry fixes, not a 503 (clients retry 5xx)."""

    status_code = 422
    error_type = "backend_not_configured"


class BackendUnavailableError(ServiceError):
    """The backend cannot serve this job now: still loading, its load failed (tried again after a
    delay), it lost its device, or its upstream is busy, unreachable or refused the key. A later retry
    may work; /health gives the reason."""

    status_code = 503
    error_type = "backend_unavailable"


class OutOfMemoryError(ServiceError):
    status_code = 503
    error_type = "out_of_memory"


class UpstreamError(ServiceError):
    status_code = 502
    error_type = "upstream_error"


class QueueUnavailableError(ServiceError):
    """The job store a cluster shares (Redis) cannot be reached: nothing can be admitted or read right
    now. Worth a retry: `Retry-After` says when (docs/scale-out.md)."""

    status_code = 503
    error_type = "queue_unavailable"

    def __init__(self, message: str, *, retry_after: int = 2) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


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
    # A cancelled job never reaches a connected caller except through the job API, where it is a
    # state, not an error.
    status_code = 409
    error_type = "cancelled"


class ClientClosedRequestError(ServiceError):
    """A synchronous caller went away before its answer: nobody reads this one; it is logged and
    counted as 499 (nginx's "client closed request"), the client's doing, not a conflict or a failure."""

    status_code = 499
    error_type = "client_closed_request"


class NotSupportedError(ServiceError):
    """A route clients of a compatibility dialect probe for a feature this service does not have
    (A1111's upscalers and interrogation, OpenAI's variations): 501, which no retry changes."""

    status_code = 501
    error_type = "not_supported"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        # OpenAI's SDKs retry every 5xx unless told not to.
        super().__init__(message, param=param, headers={"x-should-retry": "false"})


class GenerationFailedError(ServiceError):
    """The pipeline produced no usable image (NaN or black output, an unexpected library error)."""

    status_code = 500
    error_type = "generation_failed"


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def require_between(param: str, value: float, low: float, high: float, *, context: str = "") -> None:
    """Raise InvalidParameterError "<param> must be between <low> and <high><context>" unless
    low <= value <= high: the one shape of every range rule (steps, guidance, counts, tolerances)."""
    if not low <= value <= high:
        raise InvalidParameterError(f"{param} must be between {_number(low)} and {_number(high)}{context}", param=param)


def require_pixels(width: int, height: int, max_pixels: int, *, context: str = "") -> None:
    """Raise InvalidParameterError (param width) when width x height exceeds max_pixels."""
    if width * height > max_pixels:
        raise InvalidParameterError(f"width x height must be at most {max_pixels} pixels{context}", param="width")
