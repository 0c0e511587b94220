"""Logs and metric primitives.

Logs: every line carries the request id (``X-Request-ID``, accepted from the client or made
up, echoed in the response) of the request it was written for, and the ingest id of the ingest
job it was written in, through context variables that asyncio copies into tasks and threads.
``LOG_FORMAT=json`` writes one JSON object per line; the default is readable text. Query
strings are logged with ``access_token`` values scrubbed: tokens never reach a log.

Metrics: counters and histograms that the code updates as it runs and ``GET /metrics`` renders
in the Prometheus text format (:mod:`app.api.metrics`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from contextvars import ContextVar
from typing import Any

__all__ = [
    "Histogram",
    "configure_logging",
    "ingest_id_var",
    "log_context",
    "request_id_var",
    "scrub_query",
    "track_requests",
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
_access_logger = logging.getLogger("app.access")


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
    _access_logger.setLevel(access.getEffectiveLevel())
    if not getattr(access, _CONFIGURED, False):
        access.addFilter(lambda _record: False)
        setattr(access, _CONFIGURED, True)


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_ASGIApp = Callable[
    [_Scope, Callable[[], Awaitable[_Message]], Callable[[_Message], Awaitable[None]]],
    Awaitable[None],
]


_request_ids: tuple[int, str, Iterator[int]] = (0, "", iter(()))


def next_request_id() -> str:
    """32 hex digits, unique among this process' requests and (by a random prefix drawn
    once per process, forked workers included) across processes: cheaper than a UUID per
    request, which reads the OS's random source."""
    global _request_ids
    pid, prefix, numbers = _request_ids
    if pid != os.getpid():
        pid, prefix, numbers = os.getpid(), os.urandom(8).hex(), itertools.count(1)
        _request_ids = (pid, prefix, numbers)
    return f"{prefix}{next(numbers):016x}"


def track_requests(app: _ASGIApp) -> _ASGIApp:
    """Outermost ASGI wrapper: a request id for every HTTP request (the client's
    ``X-Request-ID`` when it is sane, else a new one), echoed in the response, set for every
    log line written while handling it; and one ``app.access`` line per response."""

    async def wrapper(
        scope: _Scope,
        receive: Callable[[], Awaitable[_Message]],
        send: Callable[[_Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        supplied = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        text = supplied.decode("latin-1")
        request_id = text if _REQUEST_ID.fullmatch(text) else next_request_id()
        method, path = scope["method"], scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        started = time.perf_counter()

        async def send_with_id(message: _Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
                message["headers"] = headers
                if _access_logger.isEnabledFor(logging.INFO):
                    target = f"{path}?{scrub_query(query)}" if query else path
                    status = message["status"]
                    elapsed = (time.perf_counter() - started) * 1000
                    _access_logger.info(
                        "%s %s %d %.1fms",
                        method,
                        target,
                        status,
                        elapsed,
                        extra={
                            "http_method": method,
                            "http_target": target,
                            "http_status": status,
                            "duration_ms": round(elapsed, 1),
                        },
                    )
            await send(message)

        with log_context(request_id=request_id):
            await app(scope, receive, send_with_id)

    return wrapper


class Histogram:
    """Cumulative buckets, a sum and a count (Prometheus' histogram)."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
                break

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) per bucket, ``+Inf`` last."""
        found, running = [], 0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            running += count
            found.append((bound, running))
        found.append((float("inf"), self.count))
        return found
