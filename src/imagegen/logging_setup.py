"""Logging: one format for the whole process, with the request id on every line.

Never log secrets or prompts' contents at info level; settings are logged by name only.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # A job's final line names the request that created the job (extra=), though it is logged
        # from a worker, outside that request's context.
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get() or "-"
        return True


#: Structured fields that request and job lines carry (`extra=`): JSON lines get them as keys, so a
#: log pipeline can filter by job or route; text lines already say them in the message.
EXTRA_FIELDS = (
    "job_id",
    "backend",
    "status",
    "error_type",
    "queued_ms",
    "run_ms",
    "method",
    "path",
    "route",
    "status_code",
    "duration_ms",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        for key in EXTRA_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # a record from the device process carries its traceback as text
            data["exc"] = record.exc_text
        return json.dumps(data, ensure_ascii=False)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
    handler._imagegen = True  # type: ignore[attr-defined]
    root = logging.getLogger("imagegen")
    # Replace only what an earlier call installed (create_app may run several times in one process);
    # handlers others attached (pytest's caplog, an embedding application) stay.
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "_imagegen", False)] + [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # Libraries' own chatter (download bars, config notices) stays out of the service log.
    for noisy in ("diffusers", "transformers", "huggingface_hub", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
