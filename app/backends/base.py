"""The interface every database backend implements, whole.

A :class:`Backend` is everything the service does differently on one database: how engines
connect, how a write transaction takes the log's lock, how the log is appended to
(:class:`Appender`), how other processes hear of appends (:class:`Listener`), and the few SQL
functions that differ by dialect (upserts, JSON quoting, formatting). Code outside
``app/backends/`` holds a backend and calls it; it never asks which database it is on. A third
database is one more package here, passing the contract tests (``tests/backends/``).

Appends are serialised so that commit order equals position order. A tailer reads ``position >
last``; if a lower position could commit after a higher one became visible, the tailer would
move past it and never see it. Each backend takes one lock for that, held from before the head
is read until commit, and assigns positions as head + 1, … under it, so they are also gapless.

Each appender forms its own batches (group commit): requests handed over while a transaction
is being made durable wait in a line, and the next transaction takes the whole line (up to the
batch limit) the moment the previous one commits. Outcomes go back to the store in commit
order.

This module imports nothing of SQLAlchemy at run time: the SQLite writer process imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement, Select, Table
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
    from sqlalchemy.sql.dml import Insert

    from app.config import DatabaseSettings
    from app.events.envelope import Event, NewEvent
    from app.events.plan import AppendResult, Plan

__all__ = [
    "AppendRequest",
    "Appender",
    "Backend",
    "GuardedWrite",
    "Listener",
    "OnCommit",
    "take_group",
]


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


class GuardedWrite(NamedTuple):
    """Statements to run in one transaction, only if ``guard`` still reads ``expected``.

    Plain SQL in the backend's own parameter style, and rows of parameters, so that it can
    cross to a writer in another process. ``guard`` locks what it reads until the
    transaction ends, where the database has row locks.
    """

    guard: str
    guard_parameters: list[Any]
    expected: list[list[Any]]
    #: Each statement with its rows of parameters (``executemany`` for more than one).
    statements: list[tuple[str, list[list[Any]]]]
    #: Background work (a purge's deletes): where appends and this write take turns at one
    #: write lock, it waits for a moment with no append waiting (a little while at most).
    yields: bool = False


class Appender(Protocol):
    """Writes the log: one transaction per group-committed batch, outcomes in commit order."""

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
        """Appends wait between two transactions while the caller writes to the database
        with a connection of its own, where the database has one write lock for all."""
        ...

    async def write_guarded(self, write: GuardedWrite) -> bool:
        """Make ``write`` in one transaction, unless its guard reads something else (then
        False: nothing written). Raises LogUnavailable (nothing written) if the database
        refuses a statement."""
        ...

    async def close(self) -> None:
        """Commit every request submitted so far, then release the connection."""
        ...


class Listener(Protocol):
    """Hears of other processes' appends: a wake-up, or their committed rows."""

    #: Events handed to the feed from notifications (not read from the table).
    events_received: int

    def start(self) -> None: ...

    async def close(self) -> None: ...


def take_group(waiting: deque[Any], max_events: int, events: Callable[[Any], int]) -> list[Any]:
    """The next transaction's requests: the oldest, then more while their events (counted
    by ``events``) are under ``max_events``."""
    first = waiting.popleft()
    group = [first]
    size = events(first)
    while waiting and size < max_events:
        request = waiting.popleft()
        group.append(request)
        size += events(request)
    return group


class Backend(ABC):
    """One database the log and the read models live in (see the module's docstring)."""

    #: The SQLAlchemy dialect this backend serves.
    dialect: ClassVar[str]
    #: The URL scheme ``DATABASE_URL`` starts with for it.
    scheme: ClassVar[str]

    def __init__(self, url: str) -> None:
        self.url = url

    # -- set-up ---------------------------------------------------------------------------

    @abstractmethod
    def check(self, settings: DatabaseSettings) -> None:
        """Raise ValueError, in words for the user naming the setting, if the URL or the
        backend's settings cannot serve the service."""

    def missing(self) -> str | None:
        """Why a reader would find no database here (so it must not create an empty one),
        or None."""
        return None

    @abstractmethod
    def prepare(self) -> None:
        """Whatever must exist before the first connection (a directory)."""

    @abstractmethod
    def create_engine(self, *, pool_size: int) -> AsyncEngine:
        """An engine with this backend's connection settings on every connection."""

    # -- the log ----------------------------------------------------------------------------

    @abstractmethod
    def appender(self, settings: DatabaseSettings) -> Appender:
        """The log's appender, as ``settings`` configure it."""

    def listener(
        self,
        on_head: Callable[[int], None],
        appender: Appender,
        on_events: Callable[[Sequence[Event]], None] | None = None,
    ) -> Listener | None:
        """What tells this process of other processes' appends, or None where nothing can
        (the feed's poll then does): their newest position (``on_head``), or where the
        notification carries them, the committed events themselves (``on_events``, which
        takes them only where they continue what it holds). ``appender`` is this process's
        own, whose commits the store hands the feed itself: a listener may leave them out."""
        return None

    async def write_transaction(self, connection: AsyncConnection) -> AsyncConnection:
        """``connection``, set so that its next transaction takes the database's write lock
        when it begins, where a lock taken later could fail instead of waiting."""
        return connection

    async def snapshot_transaction(self, connection: AsyncConnection) -> AsyncConnection:
        """``connection``, set so that every read of its next transaction sees the same state
        of the database (a snapshot of several tables that agree with each other)."""
        return connection

    async def database_bytes(self, connection: AsyncConnection) -> int | None:
        """How much space the database takes, or None where it cannot tell."""
        return None

    @abstractmethod
    async def lock_log(self, connection: AsyncConnection) -> None:
        """Take the lock appends take, for the rest of ``connection``'s transaction (begun
        through :meth:`write_transaction`)."""

    @abstractmethod
    async def announce(self, connection: AsyncConnection, head: int) -> None:
        """Tell other processes, when ``connection``'s transaction commits, that the log
        reaches ``head`` (writes other than appends: an import)."""

    # -- SQL --------------------------------------------------------------------------------

    @abstractmethod
    def insert(self, table: Table) -> Insert:
        """An INSERT into ``table`` that takes ``on_conflict_do_update/nothing``."""

    async def upsert(
        self,
        connection: AsyncConnection,
        table: Table,
        rows: Sequence[dict[str, Any]],
        *,
        key: Sequence[str],
        update: bool = True,
    ) -> None:
        """Insert ``rows``; on a clash of ``key``, overwrite the other columns (or keep the
        row)."""
        if not rows:
            return
        insert: Any = self.insert(table)
        columns = [name for name in rows[0] if name not in key]
        if update and columns:
            statement = insert.on_conflict_do_update(
                index_elements=list(key), set_={name: insert.excluded[name] for name in columns}
            )
        else:
            statement = insert.on_conflict_do_nothing(index_elements=list(key))
        await connection.execute(statement, list(rows))

    @abstractmethod
    def json_quoted(self, text: ColumnElement[str]) -> ColumnElement[str]:
        """``text`` as a JSON string, quoted by the database."""

    @abstractmethod
    def formatted(self, template: str, *values: ColumnElement[Any]) -> ColumnElement[str]:
        """``template`` with ``values`` put in by the database: ``%d`` for an integer, ``%s``
        for text, as printf does."""

    async def fetch_rows(
        self, connection: AsyncConnection, query: Select[Any], limit: int
    ) -> Sequence[Sequence[Any]]:
        """The rows of ``query`` (at most ``limit``) as tuples of column values."""
        rows: Sequence[Sequence[Any]] = (await connection.execute(query)).all()
        return rows
