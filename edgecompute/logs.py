"""Structured logs: one JSON object per line, carrying the id of the request being served.

::

    from edgecompute.logs import configure_json_logging, request_id
    configure_json_logging()                     # root logger -> JSON lines on stderr
    token = request_id.set("r-123")              # every record logged meanwhile carries it

The gateway sets ``request_id`` for each request (from ``X-Request-ID`` when the client sent a
sane one); embedded applications may set it themselves.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import IO, Any

__all__ = ["JsonFormatter", "configure_json_logging", "request_id"]

#: The id of the request being handled in this context (None outside requests).
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("edgecompute_request_id", default=None)

# uvicorn adds color_message (the message with ANSI colours): noise in a JSON line
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName", "color_message"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: time, level, logger, message, request_id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid is not None:
            entry["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=repr, separators=(",", ":"))


def configure_json_logging(level: int | str = logging.INFO, stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) as JSON lines; returns the handler installed."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
