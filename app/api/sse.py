"""Server-Sent Events: framing, ``Last-Event-ID`` handling and a response that drops
subscribers which vanish.

Frames are built once per event and shared by every subscriber of the same kind
(:meth:`LogEntry.frame`), and a subscriber that is behind gets its backlog as one write. An
idle subscriber is its request's suspended task and two pending futures (the feed's wake-up
and the receive channel's disconnect), with no helper task, timer or buffer of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import weakref
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
)
from datetime import UTC, datetime
from types import CoroutineType
from typing import Any, TypeVar

import msgspec
from litestar import Request
from litestar.background_tasks import BackgroundTask, BackgroundTasks
from litestar.datastructures import Cookie, MutableScopeHeaders
from litestar.enums import MediaType
from litestar.exceptions import ClientException
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import HTTPResponseBodyEvent, Receive, ReceiveMessage, Scope, Send
from sqlalchemy import ColumnElement, String, func, literal

from app.database import json_quoted
from app.eventlog import EventFilter, EventStore, LogEntry, replay_then_tail
from app.eventlog.envelope import encode_event, format_timestamp
from app.eventlog.store import FramePage
from app.eventlog.tables import MAX_POSITION, events
from app.server import CONNECTION_EXTENSION

__all__ = [
    "SQL_FRAMES",
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
_MAX_ID = str(MAX_POSITION)
# A backlog is written in pieces of about this size: a subscriber whose peer stops reading
# holds one piece (and the socket's buffers) at most, however far behind it is.
MAX_WRITE_BYTES = 256 * 1024

FrameBuilder = Callable[[LogEntry], bytes]
_T = TypeVar("_T")


def parse_last_event_id(header: str | None, query: str | None) -> int | None:
    """The position to resume after: the header wins, since a reconnecting EventSource keeps
    its original URL (with the query) and sends its newest id in the header."""
    for name, value in (("Last-Event-ID header", header), ("last_event_id parameter", query)):
        if value is None or not value.strip():
            continue
        text = value.strip()
        # Compared as text first: int() of a long digit string is itself work to refuse.
        if (
            not text.isascii()
            or not text.isdigit()
            or len(text) > len(_MAX_ID)
            or int(text) > MAX_POSITION
        ):
            raise ClientException(
                detail=f"{name} must be a non-negative integer (an event position, at most "
                f"{MAX_POSITION}), got {value[:40]!r}",
                extra={"field": name.split()[0]},
            )
        return int(text)
    return None


_FRAME = b"id: %d\nevent: %s\ndata: %s\n\n"


def _sql_frame(dialect: str, data: str, *values: ColumnElement[Any]) -> ColumnElement[str]:
    """:data:`_FRAME` built by the database from a row of the events table, ``data`` being a
    format of ``values``: SQLite's ``printf``, PostgreSQL's ``format`` (whose only
    conversion for these is ``%s``)."""
    frame = _FRAME.decode().replace("data: %s", f"data: {data}")
    if dialect == "sqlite":
        build, form = func.printf, frame
    else:
        build, form = func.format, frame.replace("%d", "%s")
    return build(literal(form, String), events.c.position, events.c.event, *values, type_=String)


# The envelope's format: its fields in Event's order.
_ENVELOPE = (
    '{"position":%d,"stream":"%s","source_id":%s,"version":%d,"event":"%s","event_id":%s,'
    '"timestamp":"%s","payload":%s}'
)


def _sql_frames(dialect: str) -> dict[FrameBuilder, ColumnElement[str]]:
    """The frames of :func:`envelope_frame` and :func:`payload_frame`, built by the database
    for the pages a replay reads from the table (see EventStore.read_frames_after).

    The source id and event id are quoted by the database (:func:`~app.database.
    json_quoted`), which escapes text exactly as msgspec does: the store checks it when it
    opens, and has the database build frames only then. Stream and event names are checked
    when appended (check_names: they go into the event line as they are) and timestamps are
    the appender's, so neither has anything to escape. Tests compare these frames with the
    service's byte for byte, over HTTP after a restart (tests/api/test_sse.py) and for every
    filter (tests/eventlog/test_tail.py), on both databases.
    """
    envelope = _sql_frame(
        dialect,
        _ENVELOPE,
        events.c.position,
        events.c.stream,
        json_quoted(dialect, events.c.source_id),
        events.c.version,
        events.c.event,
        json_quoted(dialect, events.c.event_id),
        events.c.timestamp,
        events.c.payload,
    )
    return {envelope_frame: envelope, payload_frame: _sql_frame(dialect, "%s", events.c.payload)}


def envelope_frame(entry: LogEntry) -> bytes:
    """``id`` + ``event`` + the whole envelope as ``data``."""
    if not entry.shared:
        # A replayed page's entry (one reader, nothing cached): built here without the two
        # calls through the cache, which cost a replay ~0.5 us per event.
        event = entry.event
        return _FRAME % (event.position, event.event.encode(), encode_event(event))
    return entry.frame("envelope", _build_envelope_frame)


def payload_frame(entry: LogEntry) -> bytes:
    """``id`` + ``event`` + the payload alone as ``data`` (the ingest streams' shape)."""
    return entry.frame("payload", _build_payload_frame)


def _build_envelope_frame(entry: LogEntry) -> bytes:
    event = entry.event
    return _FRAME % (event.position, event.event.encode(), entry.envelope_json())


def _build_payload_frame(entry: LogEntry) -> bytes:
    event = entry.event
    return _FRAME % (event.position, event.event.encode(), bytes(event.payload))


#: A frame builder's frames as each database builds them, by dialect name.
SQL_FRAMES = {dialect: _sql_frames(dialect) for dialect in ("sqlite", "postgresql")}


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
    # The feed's head is a committed position, so at or below the table's: a client resuming
    # at or below it (nearly all) needs no query to rule out a reset.
    if after is not None and after > store.feed.head:
        head = await store.head()
        if after > head:
            yield control_frame("reset", {"head": head})
            start = head
    # A page read from the table comes as frames the database built, when the stream does not
    # look at its entries (a stop) and the frames are known to SQL.
    frame = SQL_FRAMES.get(store.dialect, {}).get(build) if stop is None else None
    async for entries in replay_then_tail(
        store, start, event_filter, idle_timeout=heartbeat_seconds, frame=frame
    ):
        if isinstance(entries, FramePage):
            frames = entries.frames
            del entries
            for offset in range(0, len(frames), MAX_WRITE_BYTES):
                yield frames[offset : offset + MAX_WRITE_BYTES]
            del frames
            continue
        if not entries:
            yield _heartbeats.frame(store.feed.head)
            continue
        batch = entries if stop is None else _through_stop(entries, stop)
        # What was written is not held while the stream waits for more (for hours, maybe).
        del entries
        if len(batch) == 1:
            yield build(batch[0])
        else:
            for piece in _pieces(batch, build):
                yield piece
            piece = b""
        if stop is not None and stop(batch[-1]):
            return
        del batch


def _through_stop(entries: list[LogEntry], stop: Callable[[LogEntry], bool]) -> list[LogEntry]:
    """The entries up to the first one ``stop`` is true for (included), or all of them."""
    for index, entry in enumerate(entries):
        if stop(entry):
            return entries[: index + 1]
    return entries


class _Heartbeats:
    """The heartbeat frame, built once per millisecond and head: heartbeats fall due in groups
    (the feed's idle timers fire by ticks), and those of one group share it."""

    __slots__ = ("_frame", "_key")

    def __init__(self) -> None:
        self._key = (-1, -1)
        self._frame = b""

    def frame(self, head: int) -> bytes:
        millisecond = time.time_ns() // 1_000_000
        key = (millisecond, head)
        if key != self._key:
            seconds, rest = divmod(millisecond, 1000)
            moment = datetime.fromtimestamp(seconds, UTC).replace(microsecond=rest * 1000)
            self._frame = control_frame(
                "heartbeat", {"timestamp": format_timestamp(moment), "head": head}
            )
            self._key = key
        return self._frame


_heartbeats = _Heartbeats()


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


class _StreamEnd:
    """How a stream is ended from outside its task: the peer disconnects, or the process
    starts draining. Either cancels the stream's task; the stream tells that cancellation from
    any other by :meth:`taken`.

    The disconnect is watched on the receive channel without a task of its own: the pending
    ``receive()`` is resumed from its future's done callback, as a task would resume it, so an
    idle stream costs its own task's suspended stack and that one pending call.
    """

    __slots__ = ("_receive", "_receiving", "pending", "reason", "task")

    def __init__(self, task: asyncio.Task[Any], receive: Receive) -> None:
        self.task = task
        self.reason: str | None = None
        #: Cancelled for this end, and the cancellation not yet taken.
        self.pending = False
        self._receive = receive
        self._receiving: Coroutine[Any, Any, ReceiveMessage] | None = None
        self._call()

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.pending = True
            self.task.cancel()

    def taken(self) -> bool:
        """Whether the cancellation being handled is this end's alone (it is consumed)."""
        if not self.pending:
            return False
        self.pending = False
        return self.task.uncancel() == 0

    async def close(self) -> str | None:
        """No end from outside from now on; returns what ended the stream (None: nothing).
        A cancellation asked for but not delivered yet is taken here, not at the caller's
        next await."""
        receiving, self._receiving = self._receiving, None
        if receiving is not None:
            receiving.close()
        if self.reason is None:
            self.reason = _ENDED
            return None
        if self.pending:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0)
            if not self.taken():
                raise asyncio.CancelledError
        return None if self.reason == _ENDED else self.reason

    def _call(self) -> None:
        while self._receiving is None and self.reason is None:
            self._receiving = _as_coroutine(self._receive())
            if self._advance():
                return

    def _advance(self) -> bool:
        """Run the pending receive to its next suspension; False when it has returned."""
        receiving = self._receiving
        assert receiving is not None
        try:
            awaited = receiving.send(None)
        except StopIteration as returned:
            self._receiving = None
            if returned.value["type"] == "http.disconnect":
                self.stop("disconnect")
                return True
            return False  # request body: receive again
        except (Exception, asyncio.CancelledError):
            # A receive channel that fails has no peer left to stream to either.
            self._receiving = None
            logger.debug("SSE receive failed; ending the stream", exc_info=True)
            self.stop("disconnect")
            return True
        if asyncio.isfuture(awaited):
            awaited._asyncio_future_blocking = False
            awaited.add_done_callback(self._resume)
        else:  # a bare yield: asks to be resumed on the next loop iteration
            asyncio.get_running_loop().call_soon(self._resume, None)
        return True

    def _resume(self, _awaited: object) -> None:
        if self._receiving is not None and not self._advance():
            self._call()


_ENDED = "ended"


def _as_coroutine(awaitable: Awaitable[_T]) -> Coroutine[Any, Any, _T]:
    """The awaitable as a coroutine, to be stepped by hand."""
    if isinstance(awaitable, CoroutineType | Coroutine):
        return awaitable
    return _awaiting(awaitable)


async def _awaiting(awaitable: Awaitable[_T]) -> _T:
    return await awaitable


async def _send_within(send: Send, message: HTTPResponseBodyEvent, seconds: float) -> None:
    """``await send(message)``, raising TimeoutError if it takes longer than ``seconds``.

    A send to a peer that keeps reading completes without waiting (the transport takes the
    bytes): the send is started by hand, and a timer is armed only if it has to wait. That
    spares a timer per frame, a tenth of a heartbeat's cost.
    """
    sending = _as_coroutine(send(message))
    try:
        awaited = sending.send(None)
    except StopIteration:
        return
    async with asyncio.timeout(seconds):
        await _Resumed(sending, awaited)


class _Resumed:
    """Awaits the rest of a coroutine that was started by hand and is suspended on
    ``awaited``: the task waits on what the coroutine waits on, and what the task is thrown
    (a cancellation) is thrown into the coroutine, as ``await`` would do."""

    __slots__ = ("_awaited", "_coroutine")

    def __init__(self, coroutine: Coroutine[Any, Any, None], awaited: Any) -> None:
        self._coroutine = coroutine
        self._awaited = awaited

    def __await__(self) -> Generator[Any, None, None]:
        coroutine, awaited = self._coroutine, self._awaited
        while True:
            try:
                yield awaited
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as error:
                try:
                    awaited = coroutine.throw(error)
                except StopIteration:
                    return
                continue
            try:
                awaited = coroutine.send(None)
            except StopIteration:
                return


class _Drain:
    """The open streams of one application, all ended when its ``draining`` event is set: one
    task waits for the event while any stream is open, rather than one per stream."""

    __slots__ = ("_ends", "_waiting")

    def __init__(self) -> None:
        self._ends: set[_StreamEnd] = set()
        self._waiting: asyncio.Task[None] | None = None

    def add(self, end: _StreamEnd, draining: asyncio.Event) -> None:
        if draining.is_set():
            end.stop("drain")
            return
        self._ends.add(end)
        if self._waiting is None:
            self._waiting = asyncio.get_running_loop().create_task(
                self._wait(draining), name="sse-drain"
            )

    def discard(self, end: _StreamEnd) -> None:
        self._ends.discard(end)
        if not self._ends and self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None

    async def _wait(self, draining: asyncio.Event) -> None:
        await draining.wait()
        self._waiting = None
        ends, self._ends = self._ends, set()
        for end in ends:
            end.stop("drain")


#: Keyed by the application's ``draining`` event (one per application, and per event loop).
_drains: weakref.WeakKeyDictionary[asyncio.Event, _Drain] = weakref.WeakKeyDictionary()


#: The headers of a response whose headers were sent (none; never added to).
_SENT = MutableScopeHeaders()


class _SubscriberResponse(ASGIStreamingResponse):
    """Streams the iterator; a send that does not complete in time (a vanished or stalled
    peer) ends the response, and a disconnect cancels the iterator at once.

    An idle stream is its task's suspended stack, the iterator's wait and a pending receive
    (see :class:`_StreamEnd`); the shutdown signal is watched by one task per application.
    """

    __slots__ = ("abort", "draining", "retry_ms", "write_timeout")

    write_timeout: float
    #: Set when the process is shutting down: the stream ends with :func:`shutdown_frame`.
    draining: asyncio.Event | None
    retry_ms: int
    #: Closes the connection at once, unsent bytes dropped (where the server offers it).
    abort: Callable[[], None] | None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extensions: dict[str, Any] = scope.get("extensions") or {}
        self.abort = (extensions.get(CONNECTION_EXTENSION) or {}).get("abort")
        await super().__call__(scope, receive, send)

    async def start_response(self, send: Send) -> None:
        await super().start_response(send)
        # Sent: the headers need not be held for the hours the stream may last.
        self.headers = _SENT

    async def send_body(self, send: Send, receive: Receive) -> None:
        iterator = self.iterator
        task = asyncio.current_task()
        assert task is not None
        end = _StreamEnd(task, receive)
        drain = None
        if self.draining is not None:
            drain = _drains.get(self.draining)
            if drain is None:
                drain = _drains[self.draining] = _Drain()
            drain.add(end, self.draining)
        started = time.monotonic()
        try:
            try:
                async for chunk in iterator:
                    body = chunk if isinstance(chunk, bytes) else chunk.encode()
                    await _send_within(
                        send,
                        {"type": "http.response.body", "body": body, "more_body": True},
                        self.write_timeout,
                    )
                    # Not held while the stream waits for its next frame.
                    chunk = body = b""
                    if end.reason is not None:
                        break  # its cancellation was swallowed on the way
            except asyncio.CancelledError:
                if not end.taken():
                    raise
            reason = await end.close()
            if reason == "disconnect":
                return
            if reason == "drain":
                # Shutting down: a peer that cannot take one more frame now is not waited for
                # (it resumes from its Last-Event-ID all the same).
                await _send_within(
                    send,
                    {
                        "type": "http.response.body",
                        "body": shutdown_frame(self.retry_ms),
                        "more_body": True,
                    },
                    min(self.write_timeout, 1.0),
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            # Expected of subscribers that vanish (a closed laptop, a dropped network): the
            # client resumes from its Last-Event-ID. The connection goes at once, with the
            # bytes it could not take.
            logger.warning(
                "closing an SSE stream after %.0f s: the subscriber took no data for %g s "
                "(SSE_WRITE_TIMEOUT_SECONDS)",
                time.monotonic() - started,
                self.write_timeout,
            )
            if self.abort is not None:
                self.abort()
        finally:
            if drain is not None:
                drain.discard(end)
            await end.close()
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
