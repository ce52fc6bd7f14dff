"""Structured logs: the request id (API) and the deletion request id (worker) in every record.

A context variable holds each id while a request or a job is handled; `ContextFilter` copies them
into the records that reach a handler it is attached to, and `JsonFormatter` writes one JSON
object per line. `configure_logging` installs both on the root logger (`UISPS_LOG_FORMAT=json`
or `text`, `UISPS_LOG_LEVEL`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

request_id_var: ContextVar[str | None] = ContextVar("uisps_request_id", default=None)
deletion_request_id_var: ContextVar[str | None] = ContextVar("uisps_deletion_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(context)s] %(message)s"
# Attributes every LogRecord has; anything else was passed with `extra=` and goes into the JSON.
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_CONTEXT_ATTRS = ("request_id", "deletion_request_id", "context")
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators (some log viewers break
# lines there too), as Python writes them in a string literal (\n, \x1b, \x85, \u2028, ...).
_CONTROL_ESCAPES = {code: repr(chr(code))[1:-1] for code in (*range(32), *range(127, 160), 0x2028, 0x2029)}
# Marks the handler configure_logging installed, so calling it again replaces it.
_HANDLER_MARK = "_uisps_handler"


class ContextFilter(logging.Filter):
    """Sets `record.request_id` and `record.deletion_request_id` (None outside a request/job)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "deletion_request_id", None) is None:
            record.deletion_request_id = deletion_request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: timestamp (UTC, ISO 8601), level, logger, message,
    request_id, deletion_request_id (when set), `extra=` fields, and exc_info as text."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        deletion_request_id = getattr(record, "deletion_request_id", None) or deletion_request_id_var.get()
        if deletion_request_id:
            entry["deletion_request_id"] = deletion_request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key not in _CONTEXT_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """For humans: `[request id]` or `[deletion request id]` (or `-`) after the logger name.

    A message is one line: its control characters are escaped (`\\n`, `\\x1b`), since messages
    carry what clients sent (a path with `%0A` decodes to a newline) and a raw newline would let
    a client write a line that passes for another record. Tracebacks keep their lines.
    """

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.context = (
            getattr(record, "request_id", None) or getattr(record, "deletion_request_id", None) or "-"
        )
        original = record.msg, record.args
        record.msg, record.args = record.getMessage().translate(_CONTROL_ESCAPES), None
        try:
            return super().format(record)
        finally:
            record.msg, record.args = original


def make_handler(log_format: str = "text", stream: Any = None) -> logging.Handler:
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    return handler


def configure_logging(log_format: str = "text", level: str | int = "INFO") -> None:
    """Install (or replace) the service's handler on the root logger. Idempotent."""
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, _HANDLER_MARK, False):
            root.removeHandler(existing)
    handler = make_handler(log_format)
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


def root_configured_elsewhere() -> bool:
    """The root logger has handlers this module did not install (a test runner, a host process)."""
    return any(not getattr(handler, _HANDLER_MARK, False) for handler in logging.getLogger().handlers)


@contextmanager
def deletion_request_context(request_id: str) -> Iterator[None]:
    """Log records made inside carry `deletion_request_id`."""
    token = deletion_request_id_var.set(request_id)
    try:
        yield
    finally:
        deletion_request_id_var.reset(token)
