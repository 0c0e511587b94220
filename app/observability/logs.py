"""Logs: every line carries the request id (``X-Request-ID``, accepted from the client or made
up, echoed in the response) of the request it was written for, and the ingest id of the ingest
job it was written in, through context variables that asyncio copies into tasks and threads.
``LOG_FORMAT=json`` writes one JSON object per line; the default is readable text. Query
strings are logged with ``access_token`` values scrubbed: tokens never reach a log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

__all__ = [
    "access_logger",
    "configure_logging",
    "ingest_id_var",
    "log_context",
    "request_id_var",
    "scrub_query",
]

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
ingest_id_var: ContextVar[str | None] = ContextVar("ingest_id", default=None)


@contextlib.contextmanager
def log_context(*, request_id: str | None = None, ingest_id: str | None = None) -> Iterator[None]:
    """Tag every log line written inside (and in tasks started inside) with these ids."""
    tokens = []
    if request_id is not None:
        tokens.append((request_id_var, request_id_var.set(request_id)))
    if ingest_id is not None:
        tokens.append((ingest_id_var, ingest_id_var.set(ingest_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


_SECRET_IN_QUERY = re.compile(r"((?:^|&)access_token=)[^&]*")
_SECRET_IN_TEXT = re.compile(r"(access_token=)[^&\s\"']*")


def scrub_query(query: str) -> str:
    """``query`` with the value of every ``access_token`` parameter replaced."""
    if "access_token" not in query:
        return query
    return _SECRET_IN_QUERY.sub(r"\1[redacted]", query)


class _ContextFilter(logging.Filter):
    """Adds ``request_id`` and ``ingest_id`` to every record, and scrubs tokens from URLs that
    other libraries log (uvicorn's access lines hold the full query string)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        if not hasattr(record, "ingest_id"):
            record.ingest_id = ingest_id_var.get()
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(
                _SECRET_IN_TEXT.sub(r"\1[redacted]", a) if isinstance(a, str) else a
                for a in record.args
            )
        if isinstance(record.msg, str) and "access_token=" in record.msg:
            record.msg = _SECRET_IN_TEXT.sub(r"\1[redacted]", record.msg)
        return True


# Attributes every LogRecord has; anything else was passed in ``extra`` and is logged too.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, ids, and any ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and value is not None:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level logger: message [request_id=… ingest_id=…]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = [
            f"{name}={value}"
            for name in ("request_id", "ingest_id")
            if (value := getattr(record, name, None))
        ]
        if not ids:
            return text
        first, newline, rest = text.partition("\n")
        return f"{first} [{' '.join(ids)}]{newline}{rest}"


JsonFormatter.converter = time.gmtime

_CONFIGURED = "_activity_configured"
access_logger = logging.getLogger("app.access")


def configure_logging(log_format: str) -> None:
    """Give the root logger's handlers (and uvicorn's, which do not propagate) our format and
    the context filter; add a stderr handler if the root has none. Safe to call again."""
    formatter: logging.Formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    handlers: list[logging.Handler] = list(root.handlers)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        handlers.extend(logging.getLogger(name).handlers)
    consoles = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    for handler in handlers:
        # Console handlers only: others (a test runner's capture) keep their own format.
        if isinstance(handler, logging.StreamHandler) and handler.stream in consoles:
            handler.setFormatter(formatter)
        if not getattr(handler, _CONFIGURED, False):
            handler.addFilter(_ContextFilter())
            setattr(handler, _CONFIGURED, True)
    # Request lines come from ``app.access`` (with request ids and scrubbed query strings),
    # instead of uvicorn's, at the level uvicorn's were given (``serve --log-level``).
    access = logging.getLogger("uvicorn.access")
    access_logger.setLevel(access.getEffectiveLevel())
    if not getattr(access, _CONFIGURED, False):
        access.addFilter(lambda _record: False)
        setattr(access, _CONFIGURED, True)
