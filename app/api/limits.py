"""Input and connection limits, each refusal naming the limit it hit.

- Request bodies: Litestar's ``request_max_body_size`` (``REQUEST_MAX_BODY_BYTES``) refuses
  a larger body with 413; :func:`body_too_large_detail` words that refusal.
- Event payloads: :func:`check_payload_sizes` refuses a payload larger than
  ``EVENT_MAX_PAYLOAD_BYTES`` (as stored: compact JSON) with 413, naming the event.
- A refused body's unread rest: :func:`drain_refused_bodies` reads it (up to a bound) before
  the response ends, so the server does not close a socket with unread bytes in it, which
  the peer's kernel answers with a reset that can reach the client before the 413 does.
- SSE connections: :func:`limit_sse_connections` counts open streams per instance and answers
  503 with ``Retry-After`` beyond ``SSE_MAX_CONNECTIONS``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import msgspec
from litestar import Request
from litestar.enums import ScopeType
from litestar.exceptions import ClientException
from litestar.types import ASGIApp, Receive, Scope, Send

from app.eventlog import NewEvent
from app.eventlog.tables import MAX_POSITION

__all__ = [
    "MAX_POSITION",
    "SseConnections",
    "body_too_large_detail",
    "check_payload_sizes",
    "drain_refused_bodies",
    "limit_sse_connections",
]

#: The most of a refused body read and thrown away, in bytes: past it the connection closes.
DRAIN_MAX_BYTES = 16 * 1024 * 1024

#: How long a client refused for the connection cap is asked to wait, in seconds.
RETRY_AFTER_SECONDS = 5


def body_too_large_detail(request: Request[Any, Any, Any]) -> str:
    limit = request.route_handler.resolve_request_max_body_size()
    return f"the request body is larger than the limit of {limit} bytes (REQUEST_MAX_BODY_BYTES)"


def check_payload_sizes(events: Sequence[NewEvent], limit: int, *, batch: bool) -> None:
    """Refuse (413) the request if any event's payload, as stored, exceeds ``limit`` bytes."""
    for index, event in enumerate(events):
        size = len(event.payload)
        if size > limit:
            field = f"events[{index}].payload" if batch else "payload"
            raise ClientException(
                detail=f"{field} is {size} bytes as compact JSON; the limit is {limit} bytes "
                "per event (EVENT_MAX_PAYLOAD_BYTES)",
                status_code=413,
                extra={"field": field, "limit": limit, "size": size},
            )


class SseConnections:
    """Open SSE connections of this instance, against the configured cap, the streams each
    transport has written, and the frames the fan-out wrote (app/api/sse/fanout.py)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.refused = 0
        self.transports: Counter[str] = Counter()
        self.fanout_frames = 0


def drain_refused_bodies(app: ASGIApp) -> ASGIApp:
    """``app``, reading the rest of a request body it refused with 413 unread."""

    async def drained(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        state = {"ended": False, "refused": False}

        async def watched_receive() -> Any:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["ended"] = True
            return message

        async def watched_send(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] == 413:
                state["refused"] = True
            await send(message)

        await app(scope, watched_receive, watched_send)
        drained_bytes = 0
        while state["refused"] and not state["ended"] and drained_bytes < DRAIN_MAX_BYTES:
            message = await watched_receive()
            drained_bytes += len(message.get("body", b""))

    return drained


def _is_sse_route(scope: Scope) -> bool:
    return str(scope["type"]) == "http" and str(scope.get("path_template", "")).endswith("/stream")


_encoder = msgspec.json.Encoder()


def limit_sse_connections(app: ASGIApp, connections: SseConnections) -> ASGIApp:
    """Route middleware: a slot per SSE request for as long as its response runs (released on
    every way out: the stream's end, a disconnect, an error, a cancellation)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if not _is_sse_route(scope):
            await app(scope, receive, send)
            return
        if connections.open >= connections.limit:
            connections.refused += 1
            await _refuse(send, connections.limit)
            return
        connections.open += 1
        try:
            await app(scope, receive, send)
        finally:
            connections.open -= 1

    return middleware


async def _refuse(send: Send, limit: int) -> None:
    body = _encoder.encode(
        {
            "status_code": 503,
            "detail": f"this instance already serves its limit of {limit} SSE connections "
            f"(SSE_MAX_CONNECTIONS); retry in {RETRY_AFTER_SECONDS} s",
            "extra": {"limit": limit},
        }
    )
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
