"""Dialect-specific appenders: one transaction per group-committed batch.

Appends are serialised so that commit order equals position order. A tailer reads
``position > last``; if a lower position could commit after a higher one became visible, the
tailer would move past it and never see it. On SQLite the database's single write lock
(``BEGIN IMMEDIATE``) gives this; on PostgreSQL a transaction-scoped advisory lock does, held
from before the head is read until commit. Positions are assigned as head + 1, … under that
lock, so they are also gapless.

Each appender forms its own batches: requests handed over while a transaction is being made
durable wait in a line, and the next transaction takes the whole line (up to the batch limit)
the moment the previous one commits. Outcomes go back to the store in commit order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import msgspec

from app.eventlog.envelope import Event, NewEvent, utc_now
from app.eventlog.errors import LogUnavailable
from app.eventlog.plan import AppendResult, Plan, SourceKey, plan_batch, source_keys, supplied_ids
from app.sqlite import SQLITE_PRAGMAS

__all__ = [
    "APPEND_LOCK_KEY",
    "INSERT_BLOCKS",
    "NOTIFY_CHANNEL",
    "AppendRequest",
    "Appender",
    "GuardedWrite",
    "OnCommit",
    "PostgresAppender",
    "SqliteAppender",
    "SqliteWriter",
    "blocks_within",
    "insert_rows",
    "postgres_dsn",
]

logger = logging.getLogger(__name__)

# pg_advisory_xact_lock key for appends ("activity" in ASCII).
APPEND_LOCK_KEY = 0x6163746976697479
NOTIFY_CHANNEL = "activity_events"

_COLUMNS = "position, stream, source_id, version, event, event_id, timestamp, payload"
_ROW_PARAMETERS = _COLUMNS.count(",") + 1
_ROW_MARKS = "(" + ", ".join("?" * _ROW_PARAMETERS) + ")"
_INSERT = f"INSERT INTO events ({_COLUMNS}) VALUES {_ROW_MARKS}"
#: Rows per multi-row INSERT, largest first (see insert_rows), and their statements.
INSERT_BLOCKS = (1024, 256)
# OR ROLLBACK: a multi-row statement that may fail part way (a unique index) otherwise keeps a
# statement journal, a temporary file every page the statement changes is first copied into,
# so that the statement alone can be undone; it doubled the bytes a commit wrote. A failure
# here ends the whole transaction instead, which the appender rolls back in any case.
_BLOCK_INSERT = {
    size: f"INSERT OR ROLLBACK INTO events ({_COLUMNS}) VALUES " + ", ".join([_ROW_MARKS] * size)
    for size in INSERT_BLOCKS
}


class AppendRequest:
    """One caller's events (all or nothing) and the future its caller awaits."""

    __slots__ = ("events", "future", "started")

    def __init__(
        self,
        events: Sequence[NewEvent],
        future: asyncio.Future[list[AppendResult]],
        started: float,
    ) -> None:
        self.events = events
        self.future = future
        self.started = started


#: Called on the event loop, in commit order, once per transaction: the requests it held, its
#: plan (or the exception that rolled it back), and the seconds it took to write and sync.
OnCommit = Callable[[list[AppendRequest], "Plan | Exception", float], None]


class Appender(Protocol):
    async def start(self, on_commit: OnCommit) -> None:
        """Connect; from now on, ``on_commit`` hears of every transaction of submitted requests."""
        ...

    def submit(self, requests: list[AppendRequest]) -> None:
        """Queue requests (on the event loop); each outcome reaches ``on_commit`` later."""
        ...

    async def probe(self) -> str | None:
        """What stops writes now (a lock held elsewhere, a full disk), or None."""
        ...

    def turn(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Appends wait between two transactions while the caller writes to the database."""
        ...

    async def close(self) -> None:
        """Commit every request submitted so far, then release the connection."""
        ...


def take_group(waiting: deque[AppendRequest], max_events: int) -> list[AppendRequest]:
    """The next transaction's requests: the oldest, then more while under ``max_events``."""
    first = waiting.popleft()
    group = [first]
    size = len(first.events)
    while waiting and size < max_events:
        request = waiting.popleft()
        group.append(request)
        size += len(request.events)
    return group


class GuardedWrite(NamedTuple):
    """Statements to run in one transaction, only if ``guard`` still reads ``expected``.

    Plain SQL and rows of parameters, so that it can cross to the appender's process: see
    :meth:`SqliteWriter.write_guarded`.
    """

    guard: str
    guard_parameters: list[Any]
    expected: list[list[Any]]
    #: Each statement with its rows of parameters (``executemany`` for more than one).
    statements: list[tuple[str, list[list[Any]]]]


# Less free space than this on the SQLite file's filesystem reads as a full disk in /health.
MIN_FREE_BYTES = 1024 * 1024


def _event_from_row(row: Sequence[Any]) -> Event:
    return Event(
        position=row[0],
        stream=row[1],
        source_id=row[2],
        version=row[3],
        event=row[4],
        event_id=row[5],
        timestamp=row[6],
        payload=msgspec.Raw(row[7].encode()),
    )


class VersionCache:
    """Each source's current version, as this appender last committed it.

    Valid only while nobody else appends: every batch reads the head under the write lock,
    and a head other than the one this appender last committed means another writer (another
    process) moved the log, so the cache is dropped and versions are read from the table.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._versions: dict[SourceKey, int] = {}
        self._head: int | None = None

    def begin(
        self, head: int, keys: set[SourceKey]
    ) -> tuple[dict[SourceKey, int], list[SourceKey]]:
        """The cached versions of ``keys``, and the keys that must be read from the table."""
        if head != self._head:
            self._versions.clear()
        known = {key: self._versions[key] for key in keys if key in self._versions}
        return known, [key for key in keys if key not in known]

    def committed(self, plan: Plan, head: int) -> None:
        if len(self._versions) > self._capacity:
            self._versions.clear()
        self._versions.update(plan.versions)
        self._head = plan.rows[-1].position if plan.rows else head

    def forget(self) -> None:
        self._head = None


class _Call:
    """A function to run on the appender's thread, between two transactions."""

    __slots__ = ("args", "fn", "future")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.future: Future[Any] = Future()

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self.fn(*self.args)
        except BaseException as exc:
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


class _Pause:
    """Another writer's turn: the appender waits, between two transactions, until released."""

    __slots__ = ("holding", "released")

    def __init__(self) -> None:
        #: Set when the appender has stopped for this turn.
        self.holding: Future[None] = Future()
        self.released = threading.Event()

    def hold(self, limit: float) -> None:
        if not self.holding.set_running_or_notify_cancel():
            return  # the caller stopped waiting for its turn
        self.holding.set_result(None)
        if not self.released.wait(limit):
            # The lock itself is SQLite's; past this, appends wait for it there instead.
            logger.warning("a writer held its turn for more than %g s; appending again", limit)


class _Stop:
    """Commit what is waiting, close the connection, end the thread."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: Future[None] = Future()


def blocks_within(max_parameters: int, version: tuple[int, ...]) -> tuple[int, ...]:
    """The insert blocks a statement may bind: a parameter per column of each row, within
    the library's limit (999 before SQLite 3.32, 32,766 since), and none before 3.8.8, where
    a long ``VALUES`` list still counted against the 500 terms of a compound ``SELECT``."""
    if version < (3, 8, 8):
        return ()
    return tuple(size for size in INSERT_BLOCKS if size * _ROW_PARAMETERS <= max_parameters)


def insert_rows(
    connection: sqlite3.Connection, rows: Sequence[Sequence[Any]], blocks: Sequence[int]
) -> None:
    """Insert ``rows`` in order: whole ``blocks`` of rows as one statement each, the rest
    with ``executemany``.

    ``executemany`` lets go of the GIL around each row's step and has to win it back from
    the event loop every time: with the loop busy preparing the next requests, commits of
    2,000 rows spent a third of their inserting waiting for it (8.3 us per row, 5.5 of them
    on the CPU; in blocks, 5.6 us). A block is one step and one wait. Below a block,
    ``executemany`` stays: it costs less CPU per row, and small commits are the ones
    in-process appends make.

    A block that breaks a constraint rolls back the whole transaction (see ``_BLOCK_INSERT``).
    """
    start = 0
    for size in blocks:
        statement = _BLOCK_INSERT[size]
        while len(rows) - start >= size:
            block = rows[start : start + size]
            connection.execute(statement, [value for row in block for value in row])
            start += size
    if start < len(rows):
        connection.executemany(_INSERT, rows[start:])


class SqliteWriter:
    """The SQLite side of appending: one connection, one transaction per batch.

    Used from one thread at a time: the appender's own thread (:class:`SqliteAppender`) or
    the appender process's main thread (``app.eventlog.writer_process``).
    """

    def __init__(self, path: Path, *, busy_timeout_ms: int, cache_kib: int) -> None:
        self.path = path
        self.busy_ms = busy_timeout_ms
        self._cache_kib = cache_kib
        self._connection: sqlite3.Connection | None = None
        self._cache = VersionCache()
        self._blocks: tuple[int, ...] = ()

    def connect(self) -> None:
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for pragma in SQLITE_PRAGMAS:
            connection.execute(pragma)
        connection.execute(f"PRAGMA busy_timeout={self.busy_ms}")
        # Only this connection writes, so its page cache stays valid from one transaction to
        # the next: the index pages an append touches are found in memory, not re-read.
        connection.execute(f"PRAGMA cache_size=-{self._cache_kib}")
        self._blocks = blocks_within(
            connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER), sqlite3.sqlite_version_info
        )
        self._connection = connection

    def commit(self, batch: Sequence[Sequence[NewEvent]]) -> Plan | Exception:
        """One transaction of ``batch``: its plan, or the exception that rolled it back."""
        try:
            return self._write(batch)
        except sqlite3.Error as exc:
            unavailable = LogUnavailable(self._describe(exc))
            unavailable.__cause__ = exc
            return unavailable
        except Exception as exc:
            return exc

    def _describe(self, exc: sqlite3.Error) -> str:
        name = getattr(exc, "sqlite_errorname", "")
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return (
                f"the event log is locked by another process: SQLite's write lock was not "
                f"free within {self.busy_ms / 1000:g} s (SQLITE_BUSY_TIMEOUT_SECONDS); "
                "nothing was written"
            )
        if name.startswith("SQLITE_FULL") or (
            name.startswith("SQLITE_IOERR") and self._free_bytes() < MIN_FREE_BYTES
        ):
            return "the disk holding the event log is full; nothing was written"
        return f"the event log could not be written: {exc}"

    def _free_bytes(self) -> int:
        stat = os.statvfs(self.path.parent)
        return stat.f_bavail * stat.f_frsize

    def probe(self) -> str | None:
        """What stops writes now (a lock held elsewhere, a full disk), or None."""
        connection = self._connection
        if connection is None:
            return "the event log is closed"
        free = self._free_bytes()
        if free < MIN_FREE_BYTES:
            return f"the disk holding the event log is full ({free} bytes free)"
        # Take the write lock and let it go at once, waiting a moment at most.
        connection.execute("PRAGMA busy_timeout=200")
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("ROLLBACK")
        except sqlite3.Error as exc:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            if getattr(exc, "sqlite_errorname", "").startswith("SQLITE_BUSY"):
                return "the event log is locked by another process (SQLite's write lock is held)"
            return f"the event log cannot be written: {exc}"
        finally:
            connection.execute(f"PRAGMA busy_timeout={self.busy_ms}")
        return None

    def _write(self, batch: Sequence[Sequence[NewEvent]]) -> Plan:
        connection = self._connection
        assert connection is not None, "SqliteWriter.connect() was not called"
        connection.execute("BEGIN IMMEDIATE")
        try:
            head = connection.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0]
            versions, missing = self._cache.begin(head, source_keys(batch))
            for key in missing:
                found = connection.execute(
                    "SELECT max(version) FROM events WHERE stream = ? AND source_id = ?", key
                ).fetchone()[0]
                versions[key] = found or 0
            existing = self._existing(connection, supplied_ids(batch))
            plan = plan_batch(
                batch, head=head, versions=versions, existing=existing, timestamp=utc_now()
            )
            if plan.rows:
                insert_rows(connection, plan.rows, self._blocks)
            connection.execute("COMMIT")
        except BaseException:
            self._cache.forget()
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        self._cache.committed(plan, head)
        return plan

    def write_guarded(self, write: GuardedWrite) -> bool:
        """Run ``write`` in one transaction of its own; False (nothing written) if its guard
        did not read what it expected. Raises :class:`LogUnavailable` (nothing written) if
        the database refuses a statement."""
        connection = self._connection
        assert connection is not None, "SqliteWriter.connect() was not called"
        connection.execute("BEGIN IMMEDIATE")
        try:
            found = [list(row) for row in connection.execute(write.guard, write.guard_parameters)]
            if found != write.expected:
                connection.execute("ROLLBACK")
                return False
            for sql, rows in write.statements:
                if len(rows) == 1:
                    connection.execute(sql, rows[0])
                else:
                    connection.executemany(sql, rows)
            connection.execute("COMMIT")
        except BaseException as exc:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise LogUnavailable(f"the write could not be made: {exc}") from exc
            raise
        return True

    @staticmethod
    def _existing(connection: sqlite3.Connection, ids: set[str]) -> dict[str, Event]:
        found: dict[str, Event] = {}
        pending = list(ids)
        # Chunked to stay far below SQLite's host-parameter limit.
        for start in range(0, len(pending), 500):
            chunk = pending[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for row in connection.execute(
                f"SELECT {_COLUMNS} FROM events WHERE event_id IN ({marks})", chunk
            ):
                found[row[5]] = _event_from_row(row)
        return found

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class SqliteAppender:
    """Runs each batch as one synchronous transaction on the appender's own thread.

    The thread forms the batches: when a transaction commits, it starts the next one at once
    with every request handed over in the meantime, without a round trip through the event
    loop. The loop hands requests over once per burst and hears back once per transaction, so
    it and the thread overlap: it acknowledges one batch (and its callers append again) while
    the thread writes and syncs the next.
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_seconds: float = 10.0,
        max_batch_events: int = 2000,
        cache_kib: int = 64 * 1024,
    ) -> None:
        self._writer = SqliteWriter(
            path, busy_timeout_ms=int(busy_timeout_seconds * 1000), cache_kib=cache_kib
        )
        self._max_batch = max_batch_events
        self._inbox: queue.SimpleQueue[list[AppendRequest] | _Call | _Pause | _Stop] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_commit: OnCommit | None = None

    async def start(self, on_commit: OnCommit) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_commit = on_commit
        self._thread = threading.Thread(target=self._serve, name="sqlite-append", daemon=True)
        self._thread.start()
        try:
            await self._run(self._writer.connect)
        except BaseException:
            await self.close()
            raise

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._thread is None:
            raise LogUnavailable("the event log is closed")
        call = _Call(fn, args)
        self._inbox.put(call)
        return await asyncio.wrap_future(call.future)

    def submit(self, requests: list[AppendRequest]) -> None:
        self._inbox.put(requests)

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold appends between two transactions while the caller writes (a projection step).

        The caller's ``BEGIN IMMEDIATE`` then finds SQLite's write lock free, and appends go
        on the moment it is done. Left to SQLite's busy handler, a writer retries with sleeps
        growing to 100 ms, and the appender, which takes the lock again as soon as it commits,
        won nearly every retry: projections stalled for up to a second at a time under
        load. The turn orders the writers only; the lock stays SQLite's, so a turn held
        past the busy timeout lets appends go back to waiting for the lock itself.
        """
        if self._thread is None:  # closed: no appends to hold
            yield
            return
        pause = _Pause()
        self._inbox.put(pause)
        try:
            await asyncio.wrap_future(pause.holding)
            yield
        finally:
            pause.released.set()

    def _serve(self) -> None:
        inbox = self._inbox
        waiting: deque[AppendRequest] = deque()
        stop: _Stop | None = None
        while True:
            # Everything handed over by now joins the line; wait only when there is nothing
            # to write, so a batch never starts before the requests already here are in it.
            block = not waiting and stop is None
            while True:
                try:
                    item = inbox.get(block=block)
                except queue.Empty:
                    break
                block = False
                if isinstance(item, list):
                    waiting.extend(item)
                elif isinstance(item, _Call):
                    item.run()
                elif isinstance(item, _Pause):
                    item.hold(self._writer.busy_ms / 1000)
                else:
                    stop = item
            if waiting:
                self._commit(take_group(waiting, self._max_batch))
            elif stop is not None:
                self._writer.close()
                stop.future.set_result(None)
                return

    def _commit(self, group: list[AppendRequest]) -> None:
        started = time.perf_counter()
        outcome = self._writer.commit([request.events for request in group])
        seconds = time.perf_counter() - started
        assert self._loop is not None
        assert self._on_commit is not None
        # RuntimeError: the event loop is gone, and nobody waits for these outcomes any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._on_commit, group, outcome, seconds)

    async def probe(self) -> str | None:
        if self._thread is None:
            return "the event log is closed"
        return await self._run(self._writer.probe)  # type: ignore[no-any-return]

    async def write_guarded(self, write: GuardedWrite) -> bool:
        """Run ``write`` on the appender's connection, between two of its transactions."""
        return await self._run(self._writer.write_guarded, write)  # type: ignore[no-any-return]

    async def close(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._thread = None
        stop = _Stop()
        self._inbox.put(stop)
        await asyncio.wrap_future(stop.future)
        thread.join()  # it has nothing left to do but return


def postgres_dsn(url: str) -> str:
    """A libpq-style DSN for asyncpg from a SQLAlchemy ``postgresql+asyncpg://`` URL."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresAppender:
    """One dedicated asyncpg connection; each batch is one transaction under the append lock.

    A task on the event loop forms the batches: whatever was submitted while a transaction
    was being committed goes into the next one.
    """

    def __init__(self, url: str, *, max_batch_events: int = 2000) -> None:
        self._dsn = postgres_dsn(url)
        self._max_batch = max_batch_events
        self._connection: Any = None
        self._cache = VersionCache()
        self._waiting: deque[AppendRequest] = deque()
        self._wake = asyncio.Event()
        self._stopping = False
        self._on_commit: OnCommit | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, on_commit: OnCommit) -> None:
        await self._connect()
        self._on_commit = on_commit
        self._task = asyncio.create_task(self._serve(), name="event-log-writer")

    async def _connect(self) -> Any:
        import asyncpg

        if self._connection is None or self._connection.is_closed():
            self._connection = await asyncpg.connect(self._dsn)
        return self._connection

    def submit(self, requests: list[AppendRequest]) -> None:
        self._waiting.extend(requests)
        self._wake.set()

    async def _serve(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                group = take_group(self._waiting, self._max_batch)
                started = time.perf_counter()
                outcome: Plan | Exception
                try:
                    outcome = await self._transaction([request.events for request in group])
                except Exception as exc:
                    outcome = exc
                assert self._on_commit is not None
                try:
                    self._on_commit(group, outcome, time.perf_counter() - started)
                except Exception:
                    # The outcome is the store's to deliver; the next batch must still go.
                    logger.exception("delivering the outcome of an append failed")
            if self._stopping:
                return

    async def _transaction(self, batch: Sequence[Sequence[NewEvent]]) -> Plan:
        import asyncpg

        try:
            connection = await self._connect()
            async with connection.transaction():
                plan, head = await self._write(connection, batch)
        except BaseException as exc:
            self._cache.forget()
            if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
                await self._discard()
                raise LogUnavailable(f"the event log could not be written: {exc}") from exc
            raise
        self._cache.committed(plan, head)
        return plan

    async def probe(self) -> str | None:
        # The connection is the writer's alone; /health's reads show whether the server answers.
        return None

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        # Appends take only their advisory lock: other writers never wait for them.
        yield

    async def _discard(self) -> None:
        if self._connection is not None:
            self._connection.terminate()
            self._connection = None

    async def _write(
        self, connection: Any, batch: Sequence[Sequence[NewEvent]]
    ) -> tuple[Plan, int]:
        await connection.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
        head = await connection.fetchval("SELECT coalesce(max(position), 0) FROM events")
        versions, missing = self._cache.begin(head, source_keys(batch))
        if missing:
            records = await connection.fetch(
                "SELECT s.stream, s.source_id, (SELECT max(e.version) FROM events e"
                " WHERE e.stream = s.stream AND e.source_id = s.source_id)"
                " FROM unnest($1::text[], $2::text[]) AS s(stream, source_id)",
                [key[0] for key in missing],
                [key[1] for key in missing],
            )
            versions.update({(r[0], r[1]): r[2] or 0 for r in records})
        ids = supplied_ids(batch)
        existing: dict[str, Event] = {}
        if ids:
            for record in await connection.fetch(
                f"SELECT {_COLUMNS} FROM events WHERE event_id = ANY($1::text[])", list(ids)
            ):
                existing[record[5]] = _event_from_row(record)
        plan = plan_batch(
            batch, head=head, versions=versions, existing=existing, timestamp=utc_now()
        )
        if plan.rows:
            columns = list(zip(*plan.rows, strict=True))
            await connection.execute(
                f"INSERT INTO events ({_COLUMNS}) SELECT * FROM unnest($1::bigint[], $2::text[],"
                " $3::text[], $4::int[], $5::text[], $6::text[], $7::text[], $8::text[])",
                *columns,
            )
            # Delivered at commit; it only wakes other processes' tails (the table is the data).
            await connection.execute(
                "SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(plan.rows[-1].position)
            )
        return plan, head

    async def close(self) -> None:
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            await self._task
            self._task = None
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
