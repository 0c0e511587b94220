"""The event store: the only code that writes the events table.

Appends are group-committed: every request waiting while the previous transaction was being
made durable goes into the next transaction together, so one fsync acknowledges many callers.
A request is still all or nothing on its own (a conflict in one does not fail the others), and
``append`` returns only after the transaction holding the request has committed.

Requests reach the appender once per turn of the event loop, not one by one: the callers a
commit wakes all run before the hand-over, so they travel (and usually commit) together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, NamedTuple, TypeVar

import msgspec
from sqlalchemy import ColumnElement, Select, String, func, literal, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.backends import Appender, AppendRequest, Backend, GuardedWrite, Listener, backend_of
from app.config import DatabaseSettings
from app.eventlog.filters import EventFilter
from app.eventlog.metrics import AppendFailure, AppendMetrics
from app.eventlog.notify import LogFeed
from app.eventlog.tables import EVENT_COLUMNS, events
from app.events.envelope import Event, NewEvent
from app.events.errors import AppendError, LogUnavailable
from app.events.plan import AppendResult, Plan

__all__ = [
    "AppendResult",
    "EventStore",
    "FramePage",
    "Page",
    "check_names",
    "read_head",
    "read_page",
    "rows_within",
    "to_event",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Page(NamedTuple):
    events: list[Event]
    # Every position up to here has been looked at: the next page starts after it.
    scanned_to: int
    head: int


class FramePage(NamedTuple):
    """A page of matching events as their frames, one after the other, built by the database
    from the rows (see :meth:`EventStore.read_frames_after`)."""

    frames: bytes
    frame_count: int
    # As in Page.
    scanned_to: int
    head: int


#: What an event read from the table holds beyond its payload (its columns and objects).
_EVENT_OVERHEAD_BYTES = 200


def rows_within(budget: int, page: Page | FramePage) -> int:
    """How many events like those of ``page`` (a page of frames: their frames; of events:
    their payloads, and what each holds besides) fit in ``budget`` bytes, at least one: the
    next table read's rows, so that a page of large events holds about ``budget`` and not
    thousands of them. ``page`` holds at least one event."""
    if isinstance(page, FramePage):
        count, size = page.frame_count, len(page.frames)
    else:
        count = len(page.events)
        size = sum(len(event.payload) for event in page.events) + _EVENT_OVERHEAD_BYTES * count
    return max(1, budget * count // size)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")
_SOURCE_ID = re.compile(r"[^\x00-\x1f\x7f]{1,200}")

# Names already found valid. A log has few distinct streams and event names and keeps
# appending to the same sources, so most checks are one set lookup; the set is bounded.
_valid: set[tuple[str, str, str]] = set()
_VALID_CAPACITY = 10_000


def check_names(event: NewEvent | Event) -> None:
    key = (event.stream, event.event, event.source_id)
    if key in _valid:
        return
    # Stream and event names go into SSE frames verbatim: a newline would forge a frame.
    if not _NAME.fullmatch(event.stream):
        raise ValueError(f"stream must be 1-100 of A-Z a-z 0-9 _ . : -, got {event.stream!r}")
    if not _NAME.fullmatch(event.event):
        raise ValueError(f"event must be 1-100 of A-Z a-z 0-9 _ . : -, got {event.event!r}")
    if not _SOURCE_ID.fullmatch(event.source_id):
        raise ValueError(
            f"source_id must be 1-200 characters without control characters, "
            f"got {event.source_id!r}"
        )
    if len(_valid) >= _VALID_CAPACITY:
        _valid.clear()
    _valid.add(key)


async def read_head(connection: AsyncConnection) -> int:
    """The highest committed position (0 for an empty log), read on ``connection``."""
    result = await connection.execute(select(func.coalesce(func.max(events.c.position), 0)))
    return int(result.scalar_one())


async def _rows(
    connection: AsyncConnection, query: Select[Any], limit: int
) -> Sequence[Sequence[Any]]:
    """The rows of ``query`` (at most ``limit``), fetched as the connection's backend
    fetches them fastest."""
    return await backend_of(connection).fetch_rows(connection, query, limit)


def _to_event(row: Sequence[Any]) -> Event:
    # Positional, in EVENT_COLUMNS' order: a replay makes one per event, and keywords cost more.
    position, stream, source_id, version, event, event_id, timestamp, payload = row
    return Event(
        position, stream, source_id, version, event, event_id, timestamp, msgspec.Raw(payload)
    )


#: A row of :data:`EVENT_COLUMNS` as an event.
to_event = _to_event


def page_query(
    after: int,
    head: int,
    event_filter: EventFilter,
    limit: int,
    columns: Sequence[ColumnElement[Any]] = EVENT_COLUMNS,
) -> Select[Any]:
    """The table read behind every page, replay and catch-up: matching rows in
    ``(after, head]``, in position order."""
    return (
        select(*columns)
        .where(events.c.position > after, events.c.position <= head)
        .where(*event_filter.clauses())
        .order_by(events.c.position)
        .limit(limit)
    )


async def read_page(
    connection: AsyncConnection,
    after: int,
    event_filter: EventFilter | None = None,
    limit: int = 1000,
) -> Page:
    """Up to ``limit`` matching events above ``after``, read on the caller's connection."""
    event_filter = event_filter or EventFilter()
    # The head first: every row at or below it is committed (commit order is position order),
    # so a short page can say "scanned up to the head" and the next read starts there.
    head = await read_head(connection)
    if after >= head:
        return Page([], after, head)
    query = page_query(after, head, event_filter, limit)
    found = [_to_event(row) for row in await _rows(connection, query, limit)]
    scanned_to = found[-1].position if len(found) == limit else head
    if event_filter.rechecked:
        found = [event for event in found if event_filter.matches(event)]
    return Page(found, scanned_to, head)


async def read_frame_page(
    connection: AsyncConnection,
    after: int,
    event_filter: EventFilter,
    limit: int,
    frame: ColumnElement[str],
) -> FramePage:
    """As :func:`read_page`, but each matching row's ``frame`` (a SQL expression over the
    events table's columns) and not its event. The filter must need no check on the rows
    (not :attr:`EventFilter.rechecked`)."""
    assert not event_filter.rechecked, "a frame page cannot be checked in Python"
    head = await read_head(connection)
    if after >= head:
        return FramePage(b"", 0, after, head)
    query = page_query(after, head, event_filter, limit, (events.c.position, frame))
    rows = await _rows(connection, query, limit)
    scanned_to = rows[-1][0] if len(rows) == limit else head
    # Read as text, as every column is, so a row that is not UTF-8 fails the read here too.
    return FramePage("".join([row[1] for row in rows]).encode(), len(rows), scanned_to, head)


#: Text of every kind a column can hold: the first 2,048 code points but NUL (which neither
#: database keeps in text; controls, quotes, the backslash, DEL, C1 controls, accents),
#: separators, a BOM, and characters beyond the BMP.
_QUOTING_SAMPLE = "".join(map(chr, range(1, 2048))) + "\u2028\u2029\ufeff\uffff\U0001f600\U0010ffff"


async def _quotes_as_msgspec(connection: AsyncConnection) -> bool:
    """Whether this database quotes text as JSON (:meth:`~app.backends.base.Backend.
    json_quoted`) exactly as msgspec does, so that frames it builds are those the service
    builds (false, too, for one without the function)."""
    quoted = backend_of(connection).json_quoted(literal(_QUOTING_SAMPLE, String))
    try:
        result = await connection.execute(select(quoted))
    except DBAPIError:
        return False
    return bool(result.scalar_one() == msgspec.json.encode(_QUOTING_SAMPLE).decode())


class EventStore:
    """Append, read and follow the log. Create with :meth:`open`, release with :meth:`close`."""

    def __init__(self, engine: AsyncEngine, backend: Backend, appender: Appender) -> None:
        self._engine = engine
        self._appender = appender
        self._loop = asyncio.get_running_loop()
        # Requests of this turn of the event loop, handed to the appender at its end.
        self._pending: list[AppendRequest] = []
        self._listener: Listener | None = None
        self._closed = False
        self._reads: set[asyncio.Task[Any]] = set()
        #: Whether the database builds frames (see frames_from_rows), checked when opened.
        self._frames_in_sql = False
        #: The database the log is in.
        self.backend = backend
        self.feed: LogFeed
        self.metrics = AppendMetrics()

    @property
    def engine(self) -> AsyncEngine:
        """The engine the store reads with."""
        return self._engine

    @classmethod
    async def open(
        cls,
        engine: AsyncEngine,
        settings: DatabaseSettings | None = None,
        *,
        poll_seconds: float = 1.0,
        # The newest events kept in memory for tails and projection steps: a step that keeps
        # up takes its page from here and not from the table, as long as the events appended
        # between two steps fit. Bounded in bytes too.
        feed_capacity: int = 50_000,
        feed_max_bytes: int = 64 * 1024 * 1024,
    ) -> EventStore:
        """The log in ``engine``'s database, appended to as ``settings`` configure (their
        defaults if None)."""
        backend = backend_of(engine)
        appender = backend.appender(settings or DatabaseSettings())
        store = cls(engine, backend, appender)
        store._frames_in_sql = await store._read_to_the_end(_quotes_as_msgspec)
        if not store._frames_in_sql:
            logger.warning(
                "the database does not quote JSON text as the service does: SSE replays "
                "read events and build their frames in Python (slower)"
            )
        await appender.start(store._committed)
        store.feed = LogFeed(
            store._read_for_feed,
            head=await store.head(),
            capacity=feed_capacity,
            max_bytes=feed_max_bytes,
            poll_seconds=poll_seconds,
        )
        store.feed.start()
        store._listener = backend.listener(
            store.feed.advance_to, appender, on_events=store.feed.publish
        )
        if store._listener is not None:
            store._listener.start()
        return store

    async def close(self) -> None:
        """Stop taking appends, finish the ones already queued, release every resource."""
        if self._closed:
            return
        self._closed = True
        self._hand_over()
        # Commits what was handed over, and delivers every outcome, before it returns.
        await self._appender.close()
        if self._listener is not None:
            await self._listener.close()
        await self.feed.close()
        if self._reads:
            await asyncio.gather(*self._reads, return_exceptions=True)

    # -- appending -------------------------------------------------------------------------

    async def append(self, batch: Sequence[NewEvent]) -> list[AppendResult]:
        """Append ``batch`` atomically; returns once it is durable.

        Raises :class:`VersionConflict` or :class:`EventIdReused` (nothing written),
        :class:`LogUnavailable` if the database cannot be written.
        """
        if not batch:
            raise ValueError("an append needs at least one event")
        if self._closed:
            raise LogUnavailable("the event log is shutting down")
        for event in batch:
            check_names(event)
        if len(batch) > 1:
            ids = [event.event_id for event in batch if event.event_id is not None]
            if len(ids) != len(set(ids)):
                raise ValueError("event_id values must be unique within one append")
        future: asyncio.Future[list[AppendResult]] = self._loop.create_future()
        pending = self._pending
        if not pending:
            # After every callback already due: the callers woken by the same commit append
            # in this turn too, and go over together.
            self._loop.call_soon(self._hand_over)
        pending.append(AppendRequest(batch, future, time.perf_counter()))
        try:
            return await future
        except AppendError:
            self.metrics.requests["conflict"] += 1
            raise
        except LogUnavailable:
            self.metrics.requests["unavailable"] += 1
            raise

    @property
    def notified_events(self) -> int:
        """Events of other processes' commits taken from their notifications, not the table."""
        return 0 if self._listener is None else self._listener.events_received

    async def probe(self) -> str | None:
        """None if appends can go ahead; else what stops them (the newest failure's cause,
        confirmed by a probe of the database: a lock held elsewhere, a full disk)."""
        failure = self.metrics.last_failure
        if failure is None:
            return None
        problem = await self._appender.probe()
        if problem is None and self.metrics.last_failure is failure:
            self.metrics.last_failure = None
        return problem

    async def write_guarded(self, write: GuardedWrite) -> bool:
        """Make ``write`` through the log's appender, unless its guard reads something else
        (then False: nothing written).

        Where the log and other writers share one write lock (SQLite), a writer with its own
        connection holds appends for as long as its transaction lasts, and with its
        statements made on the event loop every statement waits its turn on a busy loop.
        Here the statements run back to back in the appender, between two of its
        transactions.
        """
        if self._closed:
            raise LogUnavailable("the event log is shutting down")
        return await self._appender.write_guarded(write)

    def write_turn(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold this store's appends while the caller writes to the same database, so that
        it does not wait on, or stall, them for the database's write lock, where appends and
        other writers share one (see :meth:`~app.backends.base.Appender.turn`)."""
        return self._appender.turn()

    async def append_one(self, event: NewEvent) -> AppendResult:
        return (await self.append([event]))[0]

    def _hand_over(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            self._appender.submit(pending)

    def _committed(
        self, group: list[AppendRequest], outcome: Plan | Exception, seconds: float
    ) -> None:
        """One transaction's outcome, on the event loop, in commit order."""
        metrics = self.metrics
        if isinstance(outcome, Exception):
            exc = outcome
            if not isinstance(exc, LogUnavailable):
                logger.error("append failed", exc_info=exc)
                exc = LogUnavailable(f"the event log could not be written: {exc}")
            metrics.failed_transactions += 1
            metrics.last_failure = AppendFailure(str(exc))
            logger.warning("append of %d request(s) refused: %s", len(group), exc)
            for request in group:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        plan = outcome
        metrics.transactions += 1
        written = plan.events()
        metrics.events += len(written)
        metrics.batch_events.observe(sum(len(request.events) for request in group))
        metrics.commit_seconds.observe(seconds)
        metrics.last_failure = None
        now = time.perf_counter()
        ok = 0
        latency = metrics.latency
        for request, result in zip(group, plan.outcomes, strict=True):
            future = request.future
            if future.done():
                continue
            if isinstance(result, AppendError):
                future.set_exception(result)
            else:
                future.set_result(result)
                ok += 1
                latency.observe(now - request.started)
        metrics.requests["ok"] += ok
        if written:
            self.feed.publish(written)

    # -- reading ---------------------------------------------------------------------------

    async def _read_to_the_end(self, read: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``read`` on a pooled connection to its end, even if the caller is cancelled.

        SSE subscribers hang up in the middle of reads all the time. A query cancelled mid-way
        makes SQLAlchemy discard its connection, and with aiosqlite that leaves a close task
        pending forever, one per hang-up; finishing a short read is cheaper and leaks nothing.
        """

        async def run() -> T:
            async with self._engine.connect() as connection:
                return await read(connection)

        task = asyncio.create_task(run())
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)
        return await asyncio.shield(task)

    async def read_with(self, read: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """``read`` on a pooled connection, run to its end even if the caller is cancelled."""
        return await self._read_to_the_end(read)

    async def head(self) -> int:
        """The highest committed position (0 for an empty log)."""
        return await self._read_to_the_end(read_head)

    async def read_after(
        self, after: int, event_filter: EventFilter | None = None, limit: int = 1000
    ) -> Page:
        """Up to ``limit`` matching events with a position above ``after``, in order."""
        return await self._read_to_the_end(
            partial(read_page, after=after, event_filter=event_filter, limit=limit)
        )

    def frames_from_rows(self, event_filter: EventFilter) -> bool:
        """Whether :meth:`read_frames_after` can read pages for ``event_filter``: where the
        database quotes text as msgspec does (checked when the store opened), for filters
        the query applies whole."""
        return self._frames_in_sql and not event_filter.rechecked

    async def read_frames_after(
        self, after: int, event_filter: EventFilter, limit: int, frame: ColumnElement[str]
    ) -> FramePage:
        """Up to ``limit`` matching events above ``after`` as their ``frame``, built by the
        database (see :meth:`frames_from_rows`). A replay's page then costs the event loop
        one string per event and no event objects: SQLite builds the frames in C on its own
        thread, outside the GIL the event loop needs, PostgreSQL in its own process
        (bench/README.md, replay)."""
        return await self._read_to_the_end(
            partial(
                read_frame_page, after=after, event_filter=event_filter, limit=limit, frame=frame
            )
        )

    async def _read_for_feed(self, after: int, limit: int) -> list[Event]:
        async with self._engine.connect() as connection:
            query = (
                select(*EVENT_COLUMNS)
                .where(events.c.position > after)
                .order_by(events.c.position)
                .limit(limit)
            )
            return [_to_event(row) for row in await _rows(connection, query, limit)]

    async def read_source(
        self, stream: str, source_id: str, *, until_position: int | None = None
    ) -> list[Event]:
        """Every event of one source, in version order (optionally as of a position)."""
        query = select(*EVENT_COLUMNS).where(
            events.c.stream == stream, events.c.source_id == source_id
        )
        if until_position is not None:
            query = query.where(events.c.position <= until_position)
        async with self._engine.connect() as connection:
            rows = (await connection.execute(query.order_by(events.c.version))).all()
        return [_to_event(row) for row in rows]

    async def last_event(self, stream: str, source_id: str) -> Event | None:
        """The newest event of one source, or None if it has none."""
        query = (
            select(*EVENT_COLUMNS)
            .where(events.c.stream == stream, events.c.source_id == source_id)
            .order_by(events.c.version.desc())
            .limit(1)
        )
        async with self._engine.connect() as connection:
            row = (await connection.execute(query)).first()
        return None if row is None else _to_event(row)

    async def source_version(self, stream: str, source_id: str) -> int:
        async with self._engine.connect() as connection:
            result = await connection.execute(
                select(func.coalesce(func.max(events.c.version), 0)).where(
                    events.c.stream == stream, events.c.source_id == source_id
                )
            )
            return int(result.scalar_one())
