"""Server-Sent Events as the contract frames them: ``Last-Event-ID``, each event's frame
(built once per event and shared by every subscriber of the same kind, or by the database
for a replay's pages), heartbeats, control frames, and the body of a stream (replay, then
live). How the frames reach a subscriber is :mod:`app.api.sse.transport`'s.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar.exceptions import ClientException
from sqlalchemy import ColumnElement

from app.backends import Backend
from app.eventlog import EventFilter, EventStore, LogEntry, Truncated, replay_then_tail
from app.eventlog.notify import Sink
from app.eventlog.store import FramePage
from app.eventlog.tables import MAX_POSITION, events
from app.events.envelope import encode_event, format_timestamp

__all__ = [
    "MAX_WRITE_BYTES",
    "SSE_HEADERS",
    "FrameBuilder",
    "control_frame",
    "envelope_frame",
    "event_stream",
    "parse_last_event_id",
    "payload_frame",
    "shutdown_frame",
    "sql_frames",
]

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_MAX_ID = str(MAX_POSITION)
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


def _sql_frame(backend: Backend, data: str, *values: ColumnElement[Any]) -> ColumnElement[str]:
    """:data:`_FRAME` built by the database from a row of the events table, ``data`` being a
    format of ``values``."""
    frame = _FRAME.decode().replace("data: %s", f"data: {data}")
    return backend.formatted(frame, events.c.position, events.c.event, *values)


# The envelope's format: its fields in Event's order.
_ENVELOPE = (
    '{"position":%d,"stream":"%s","source_id":%s,"version":%d,"event":"%s","event_id":%s,'
    '"timestamp":"%s","payload":%s}'
)


def _sql_frames(backend: Backend) -> dict[FrameBuilder, ColumnElement[str]]:
    """The frames of :func:`envelope_frame` and :func:`payload_frame`, built by the database
    for the pages a replay reads from the table (see EventStore.read_frames_after).

    The source id and event id are quoted by the database (:meth:`~app.backends.base.
    Backend.json_quoted`), which escapes text exactly as msgspec does: the store checks it
    when it opens, and has the database build frames only then. Stream and event names are
    checked when appended (check_names: they go into the event line as they are) and
    timestamps are the appender's, so neither has anything to escape. Tests compare these
    frames with the service's byte for byte, over HTTP after a restart (tests/api/test_sse.py)
    and for every filter (tests/eventlog/test_tail.py), on every backend.
    """
    envelope = _sql_frame(
        backend,
        _ENVELOPE,
        events.c.position,
        events.c.stream,
        backend.json_quoted(events.c.source_id),
        events.c.version,
        events.c.event,
        backend.json_quoted(events.c.event_id),
        events.c.timestamp,
        events.c.payload,
    )
    return {envelope_frame: envelope, payload_frame: _sql_frame(backend, "%s", events.c.payload)}


#: Each backend's frames (by its class: the SQL does not depend on the URL).
_frames_by_backend: dict[type[Backend], dict[FrameBuilder, ColumnElement[str]]] = {}


def sql_frames(backend: Backend) -> dict[FrameBuilder, ColumnElement[str]]:
    """A frame builder's frames as ``backend``'s database builds them."""
    found = _frames_by_backend.get(type(backend))
    if found is None:
        found = _frames_by_backend[type(backend)] = _sql_frames(backend)
    return found


def envelope_frame(entry: LogEntry) -> bytes:
    """``id`` + ``event`` + the whole envelope as ``data``."""
    if not entry.shared:
        # A replayed page's entry (one reader, nothing cached): built here without the two
        # calls through the cache, which a replay would pay for every event.
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
    sink: Callable[[], Sink | None] | None = None,
) -> AsyncIterator[bytes]:
    """The body of an SSE response: ``retry``, optional ``reset``, replay, then live frames
    with heartbeats; a ``truncated`` frame (no id) before a replay reaches into events
    retention removed, naming their range and archive segment. Ends after an entry for
    which ``stop`` is true.

    ``sink``, asked once the response has started, gives the sink that takes the live
    frames while the stream is caught up, written outside this body (:mod:`app.api.sse.
    fanout`); the body then carries the rest."""
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
    frame = sql_frames(store.backend).get(build) if stop is None else None
    async for entries in replay_then_tail(
        store,
        start,
        event_filter,
        idle_timeout=heartbeat_seconds,
        frame=frame,
        report_truncated=True,
        sink=None if sink is None else sink(),
    ):
        if isinstance(entries, Truncated):
            # Never a silent skip: what retention removed is named, with where it is kept.
            for segment in entries.segments:
                yield control_frame("truncated", segment.describe())
            continue
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
