"""A request id for every HTTP request, set for its log lines, and one access line per
response."""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

from app.observability.logs import access_logger, log_context, scrub_query

__all__ = ["next_request_id", "track_requests"]

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
                if access_logger.isEnabledFor(logging.INFO):
                    target = f"{path}?{scrub_query(query)}" if query else path
                    status = message["status"]
                    elapsed = (time.perf_counter() - started) * 1000
                    access_logger.info(
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
