"""Server-Sent Events: framing, ``Last-Event-ID`` handling and a response that drops
subscribers which vanish.

Frames are built once per event and shared by every subscriber of the same kind
(:meth:`LogEntry.frame`), and a subscriber that is behind gets its backlog as one write.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import anyio
import msgspec
from litestar import Request
from litestar.background_tasks import BackgroundTask, BackgroundTasks
from litestar.datastructures import Cookie
from litestar.enums import MediaType
from litestar.exceptions import ClientException
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import Receive, Send

from app.eventlog import EventFilter, EventStore, LogEntry, replay_then_tail
from app.eventlog.envelope import utc_now

__all__ = [
    "SSE_HEADERS",
    "EventStreamResponse",
    "FrameBuilder",
    "envelope_frame",
    "event_stream",
    "parse_last_event_id",
    "payload_frame",
]

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_MAX_ID_DIGITS = 19  # a position is a signed 64-bit integer
# A backlog is written in pieces of about this size: a subscriber whose peer stops reading
# holds one piece (and the socket's buffers) at most, however far behind it is.
MAX_WRITE_BYTES = 256 * 1024

FrameBuilder = Callable[[LogEntry], bytes]


def parse_last_event_id(header: str | None, query: str | None) -> int | None:
    """The position to resume after: the header wins, since a reconnecting EventSource keeps
    its original URL (with the query) and sends its newest id in the header."""
    for name, value in (("Last-Event-ID header", header), ("last_event_id parameter", query)):
        if value is None or not value.strip():
            continue
        text = value.strip()
        if not text.isascii() or not text.isdigit() or len(text) > _MAX_ID_DIGITS:
            raise ClientException(
                detail=f"{name} must be a non-negative integer (an event position), "
                f"got {value[:40]!r}",
                extra={"field": name.split()[0]},
            )
        return int(text)
    return None


def envelope_frame(entry: LogEntry) -> bytes:
    """``id`` + ``event`` + the whole envelope as ``data``."""
    return entry.frame("envelope", _build_envelope_frame)


def payload_frame(entry: LogEntry) -> bytes:
    """``id`` + ``event`` + the payload alone as ``data`` (the ingest streams' shape)."""
    return entry.frame("payload", _build_payload_frame)


def _build_envelope_frame(entry: LogEntry) -> bytes:
    event = entry.event
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (
        event.position,
        event.event.encode(),
        entry.envelope_json(),
    )


def _build_payload_frame(entry: LogEntry) -> bytes:
    event = entry.event
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (
        event.position,
        event.event.encode(),
        bytes(event.payload),
    )


def control_frame(event: str, data: dict[str, Any]) -> bytes:
    """A frame with no ``id``: it must not move the client's Last-Event-ID."""
    return b"event: %s\ndata: %s\n\n" % (event.encode(), msgspec.json.encode(data))


async def event_stream(
    store: EventStore,
    after: int | None,
    event_filter: EventFilter,
    *,
    build: FrameBuilder,
    heartbeat_seconds: float,
    retry_ms: int,
    stop: Callable[[LogEntry], bool] | None = None,
) -> AsyncIterator[bytes]:
    """The body of an SSE response: ``retry``, optional ``reset``, replay, then live frames
    with heartbeats. Ends after an entry for which ``stop`` is true."""
    yield b"retry: %d\n\n" % retry_ms
    start = 0 if after is None else after
    if after is not None:
        head = await store.head()
        if after > head:
            yield control_frame("reset", {"head": head})
            start = head
    async for entries in replay_then_tail(
        store, start, event_filter, idle_timeout=heartbeat_seconds
    ):
        if not entries:
            yield control_frame("heartbeat", {"timestamp": utc_now(), "head": store.feed.head})
            continue
        if stop is not None:
            for index, entry in enumerate(entries):
                if stop(entry):
                    for piece in _pieces(entries[: index + 1], build):
                        yield piece
                    return
        if len(entries) == 1:
            yield build(entries[0])
            continue
        for piece in _pieces(entries, build):
            yield piece


def _pieces(entries: list[LogEntry], build: FrameBuilder) -> Iterator[bytes]:
    """The entries' frames joined into writes of at most :data:`MAX_WRITE_BYTES` (or one frame,
    if a single frame is larger)."""
    batch: list[bytes] = []
    size = 0
    for entry in entries:
        frame = build(entry)
        if batch and size + len(frame) > MAX_WRITE_BYTES:
            yield b"".join(batch)
            batch, size = [], 0
        batch.append(frame)
        size += len(frame)
    if batch:
        yield b"".join(batch)


def shutdown_frame(retry_ms: int) -> bytes:
    """The last frame of a stream ended by a shutdown: when to come back (spread out, so that
    the clients of a stopping instance do not all return in the same instant), and no id."""
    hint = random.randint(min(500, retry_ms), retry_ms) if retry_ms > 0 else 0
    return b'retry: %d\nevent: shutdown\ndata: {"retry_ms":%d}\n\n' % (hint, hint)


class _SubscriberResponse(ASGIStreamingResponse):
    """Streams the iterator; a send that does not complete in time (a vanished or stalled
    peer) ends the response, and a disconnect cancels the iterator at once."""

    __slots__ = ("draining", "retry_ms", "write_timeout")

    write_timeout: float
    #: Set when the process is shutting down: the stream ends with :func:`shutdown_frame`.
    draining: asyncio.Event | None
    retry_ms: int

    async def send_body(self, send: Send, receive: Receive) -> None:
        iterator = self.iterator
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._listen_for_disconnect, group.cancel_scope, receive)
                started = time.monotonic()
                try:
                    with anyio.CancelScope() as streaming:
                        if self.draining is not None:
                            group.start_soon(_cancel_when_set, self.draining, streaming)
                        async for chunk in iterator:
                            body = chunk if isinstance(chunk, bytes) else chunk.encode()
                            with anyio.fail_after(self.write_timeout):
                                await send(
                                    {"type": "http.response.body", "body": body, "more_body": True}
                                )
                    if streaming.cancelled_caught:
                        # Shutting down: a peer that cannot take one more frame now is not
                        # waited for (it resumes from its Last-Event-ID all the same).
                        with anyio.fail_after(min(self.write_timeout, 1.0)):
                            await send(
                                {
                                    "type": "http.response.body",
                                    "body": shutdown_frame(self.retry_ms),
                                    "more_body": True,
                                }
                            )
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except TimeoutError:
                    logger.info(
                        "closing an SSE stream after %.0fs: the subscriber stopped reading",
                        time.monotonic() - started,
                    )
                group.cancel_scope.cancel()
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()


class EventStreamResponse(Stream):
    """``text/event-stream`` with the contract's headers and the subscriber write timeout."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        write_timeout: float,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **(headers or {})},
        )
        self.write_timeout = write_timeout

    def to_asgi_response(
        self,
        app: Any,
        request: Request[Any, Any, Any],
        *,
        background: BackgroundTask | BackgroundTasks | None = None,
        cookies: Iterable[Cookie] | None = None,
        encoded_headers: Iterable[tuple[bytes, bytes]] | None = None,
        headers: dict[str, str] | None = None,
        is_head_response: bool = False,
        media_type: MediaType | str | None = None,
        status_code: int | None = None,
        type_encoders: Any = None,
    ) -> ASGIResponse:
        merged = {**headers, **self.headers} if headers is not None else dict(self.headers)
        # Exactly the contract's type: SSE is always UTF-8, so no charset parameter.
        merged["content-type"] = "text/event-stream"
        response = _SubscriberResponse(
            background=self.background or background,
            cookies=[*self.cookies, *(cookies or ())],
            encoded_headers=encoded_headers,
            encoding=self.encoding,
            headers=merged,
            is_head_response=is_head_response,
            iterator=self.iterator,  # type: ignore[arg-type]
            media_type="text/event-stream",
            status_code=self.status_code or status_code,
        )
        response.write_timeout = self.write_timeout
        # Litestar passes app=None here; the request knows its app.
        state = request.app.state
        response.draining = state.get("draining")
        services = state.get("services")
        response.retry_ms = services.settings.server.retry_ms if services is not None else 3000
        return response


async def _cancel_when_set(event: asyncio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
