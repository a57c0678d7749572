"""Logging: one format for the whole process, with the request id on every line.

Never log secrets or prompts' contents at info level; settings are logged by name only.

Every field a line carries may hold what a caller sent (a decoded path, a header, an upstream
message), so control characters are escaped in every field, in text and JSON alike (`\\n`, `\\x1b`):
a path with `%0a` cannot write a second, forged line, and ESC cannot drive the terminal that
shows the log. A traceback keeps its lines, each indented, so it cannot pass for a line either.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any, TextIO

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


# C0 controls, DEL, C1 controls, the Unicode line and paragraph separators, and the backslash itself
# (so that an escape in the log always means an escaped character).
_CONTROL = re.compile("[\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029\\\\]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """`text` with every control character written as an escape: one line, safe for any terminal."""
    return _CONTROL.sub(_escape_one, text)


def _escape_value(value: Any) -> Any:
    return escape_control(value) if isinstance(value, str) else value


def _indented(text: str) -> str:
    """A multi-line block (a traceback) under its log line: each line escaped and indented."""
    return "\n".join("    " + escape_control(line) for line in text.split("\n"))


class EscapeFilter(logging.Filter):
    """Escapes the message and the string arguments of records logged by others' loggers (uvicorn's
    access and error logs, which have their own handlers and formatters), keeping the arguments'
    shape: uvicorn's access formatter unpacks them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = escape_control(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_escape_value(value) for value in record.args)
        elif isinstance(record.args, Mapping):
            record.args = {key: _escape_value(value) for key, value in record.args.items()}
        return True


#: The loggers of the HTTP server that may carry what a caller sent (a client address taken from
#: X-Forwarded-For, an invalid request's details).
SERVER_LOGGERS = ("uvicorn.access", "uvicorn.error")


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


class TextFormatter(logging.Formatter):
    """`time level logger [request id] message`, the message escaped, a traceback indented below."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s", "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        # What logging.Formatter.format does, with every field escaped; the record's own exc_text is
        # left alone (other handlers, pytest's caplog, format the same record their own way).
        record.message = escape_control(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        values = {key: _escape_value(value) for key, value in record.__dict__.items() if key != "message"}
        values["message"] = record.message
        line = self._fmt % values if self._fmt else record.message
        if record.exc_info:
            line += "\n" + _indented(self.formatException(record.exc_info))
        elif record.exc_text:  # a record from the device process carries its traceback as text
            line += "\n" + _indented(record.exc_text)
        if record.stack_info:
            line += "\n" + _indented(self.formatStack(record.stack_info))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
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
        # JSON would escape C0 characters but not DEL, C1 or U+2028: every field is escaped the same
        # way as in text lines, so a consumer printing a field (`jq -r .message`) prints one safe line.
        return json.dumps({key: _escape_value(value) for key, value in data.items()}, ensure_ascii=False)


class ServiceLogHandler(logging.StreamHandler[TextIO]):
    """The handler configure_logging installs (a class of its own, so a later call can find it)."""


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    handler = ServiceLogHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("imagegen")
    # Replace only what an earlier call installed (create_app may run several times in one process);
    # handlers others attached (pytest's caplog, an embedding application) stay.
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, ServiceLogHandler)] + [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # Libraries' own chatter (download bars, config notices) stays out of the service log.
    for noisy in ("diffusers", "transformers", "huggingface_hub", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # The server's own logs (uvicorn's access log, when it is on) are escaped too. A logger's filters
    # outlive uvicorn's logging set-up, which replaces handlers only.
    for name in SERVER_LOGGERS:
        server_logger = logging.getLogger(name)
        if not any(isinstance(item, EscapeFilter) for item in server_logger.filters):
            server_logger.addFilter(EscapeFilter())
