"""A raw ASGI server that answers at once, to measure the load client's own ceiling.

``POST`` anything -> 201; ``GET /events/stream?n=N`` -> ``n`` pre-shaped SSE frames after
the Last-Event-ID, then the stream ends; ``GET /health`` -> 200.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import msgspec
import uvicorn

__all__ = ["app", "render_frames"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_FRAMES = 1_000_000
FRAMES_PER_WRITE = 500
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def render_frames(first: int, count: int) -> bytes:
    """SSE frames shaped like the service's: envelope JSON as data, position as id."""
    frames = []
    for position in range(first, first + count):
        envelope = {
            "position": position,
            "stream": "agent",
            "source_id": f"bench-{position % 100}",
            "version": position // 100 + 1,
            "event": "progress",
            "event_id": "6f1c2a7e-0d4b-4c39-9f3e-2b8f5a1d7c90",
            "timestamp": "2025-01-24T12:34:56.789Z",
            "payload": {
                "agent_name": "bench",
                "status": "running",
                "message": f"step {position}",
                "progress": 0.5,
            },
        }
        data = msgspec.json.encode(envelope)
        frames.append(b"id: %d\nevent: progress\ndata: %s\n\n" % (position, data))
    return b"".join(frames)


async def _drain(receive: Receive) -> None:
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [*_JSON, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _stream(scope: Scope, send: Send) -> None:
    query = parse_qs(scope["query_string"].decode())
    headers = dict(scope["headers"])
    after = int(headers.get(b"last-event-id", query.get("last_event_id", ["0"])[0]))
    count = min(int(query.get("n", ["10000"])[0]), MAX_FRAMES)
    await send({"type": "http.response.start", "status": 200, "headers": _SSE})
    await send({"type": "http.response.body", "body": b"retry: 3000\n\n", "more_body": True})
    for first in range(after + 1, after + 1 + count, FRAMES_PER_WRITE):
        size = min(FRAMES_PER_WRITE, after + 1 + count - first)
        body = render_frames(first, size)
        await send({"type": "http.response.body", "body": body, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    if scope["method"] == "POST":
        await _drain(receive)
        batch = scope["path"] == "/agents/events"
        await _respond(send, 201, b'{"positions":[]}' if batch else b'{"position":1,"version":1}')
    elif scope["path"] == "/events/stream":
        await _stream(scope, send)
    elif scope["path"] == "/health":
        await _respond(send, 200, b'{"status":"ok"}')
    else:
        await _respond(send, 404, b'{"status_code":404,"detail":"not found"}')


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Trivial ASGI peer for client ceilings")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
