"""PostgreSQL's side of appending: one dedicated connection, one transaction per
group-committed batch, under a transaction-scoped advisory lock.

The lock is taken before the head is read and held until commit, so commit order is position
order (see :mod:`app.backends.base`); other writers (projection steps, job leases) take no part
in it and never wait for appends. ``pg_notify`` at commit wakes other processes' tails.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

from app.backends.base import AppendRequest, GuardedWrite, OnCommit, take_group
from app.backends.postgres.notifications import encode as encode_notifications
from app.events.chain import GENESIS, chain_rows
from app.events.envelope import Event, NewEvent, utc_now
from app.events.errors import LogUnavailable
from app.events.plan import (
    COLUMNS,
    Plan,
    VersionCache,
    event_from_row,
    plan_batch,
    source_keys,
    supplied_ids,
)

__all__ = ["APPENDERS", "APPEND_LOCK_KEY", "NOTIFY_CHANNEL", "PostgresAppender", "postgres_dsn"]

logger = logging.getLogger(__name__)

#: pg_advisory_xact_lock key for appends ("activity" in ASCII).
APPEND_LOCK_KEY = 0x6163746976697479
NOTIFY_CHANNEL = "activity_events"

#: A simple-protocol query (no parameters): begins the transaction and takes the lock in one
#: round trip.
_BEGIN_LOCKED = f"BEGIN; SELECT pg_advisory_xact_lock({APPEND_LOCK_KEY})"

#: The most positions other writers may have committed since the cache's head for the state
#: read to catch the cache up with them (more, and the batch's sources are read instead).
MAX_CATCH_UP = 2_000

#: Under the lock, in one round trip: the head, its chain value, the current version of each
#: source asked for (0 for a new one, in the order asked), and, when the head has moved since
#: the cache's ($3) by at most MAX_CATCH_UP, the newest version of each source written since
#: (streams, source ids, versions; NULL otherwise).
_STATE = (
    "SELECT h.head, (SELECT chain FROM events WHERE position = h.head),"
    " ARRAY(SELECT coalesce((SELECT max(e.version) FROM events e"
    " WHERE e.stream = s.stream AND e.source_id = s.source_id), 0)"
    " FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS s(stream, source_id, n)"
    " ORDER BY s.n),"
    " d.streams, d.sources, d.versions"
    " FROM (SELECT coalesce(max(position), 0) AS head FROM events) AS h"
    " LEFT JOIN LATERAL (SELECT array_agg(g.stream) AS streams,"
    " array_agg(g.source_id) AS sources, array_agg(g.version) AS versions"
    " FROM (SELECT r.stream, r.source_id, max(r.version) AS version"
    # The rows after the cache's head, read along the primary key (a plan made for any $3
    # must not scan the table), only where the head moved, and by no more than the limit.
    " FROM (SELECT stream, source_id, version FROM events WHERE position > $3"
    f" ORDER BY position LIMIT {MAX_CATCH_UP}) AS r"
    " GROUP BY r.stream, r.source_id) AS g) AS d"
    f" ON h.head > $3::bigint AND h.head - $3::bigint <= {MAX_CATCH_UP}"
)

_VERSIONS = (
    "SELECT s.stream, s.source_id, coalesce((SELECT max(e.version) FROM events e"
    " WHERE e.stream = s.stream AND e.source_id = s.source_id), 0)"
    " FROM unnest($1::text[], $2::text[]) AS s(stream, source_id)"
)

#: The rows, and the notifications delivered at commit (in the order given), in one round
#: trip.
_INSERT = (
    f"WITH written AS (INSERT INTO events ({COLUMNS}) SELECT * FROM unnest($1::bigint[],"
    " $2::text[], $3::text[], $4::int[], $5::text[], $6::text[], $7::text[], $8::text[],"
    " $9::bytea[]) RETURNING 1) SELECT pg_notify($10, payload) FROM unnest($11::text[])"
    " AS payload"
)


def postgres_dsn(url: str) -> str:
    """A libpq-style DSN for asyncpg from a SQLAlchemy ``postgresql+asyncpg://`` URL."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


#: Where the appender's transactions are made: as a task of the service's event loop
#: (``loop``), or on an event loop of their own, on a thread (``thread``).
APPENDERS = ("loop", "thread")


class PostgresAppender:
    """One dedicated asyncpg connection; each batch is one transaction under the append lock.

    A task forms the batches: whatever was submitted while a transaction was being committed
    goes into the next one. The append lock is held from the transaction's first round trip
    to its commit, and every instance's appends wait while it is held; a round trip's answer
    waits for its event loop to come round to it, and the service's loop can be busy for a
    while (a projection folding a page, a replay, requests). ``POSTGRES_APPENDER=thread`` runs
    the task on an event loop of its own, on a thread, which hands each transaction's outcome
    back to the service's loop; it is not the default: the two threads then take turns at the
    GIL, which cost the appends more than it saved (bench/README.md, scaling). Guarded writes
    (projection steps) go over a second connection of their own, on the service's loop: they
    take no lock appends wait for.
    """

    def __init__(
        self,
        url: str,
        *,
        max_batch_events: int = 2000,
        chain: bool = True,
        notify_events: bool = True,
        where: str = "loop",
    ) -> None:
        if where not in APPENDERS:
            raise ValueError(f"POSTGRES_APPENDER must be loop or thread, got {where!r}")
        self._dsn = postgres_dsn(url)
        self._on_thread = where == "thread"
        # The service's loop (where outcomes are delivered) and the writer's loop.
        self._caller: asyncio.AbstractEventLoop | None = None
        self._writer_loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Whether appends carry chain values (AUDIT_CHAIN).
        self._chained = chain
        # Whether a commit's notifications carry its rows (NOTIFY_EVENTS).
        self._notify_events = notify_events
        self._max_batch = max_batch_events
        self._connection: Any = None
        self._guarded: Any = None
        self._guarded_turn = asyncio.Lock()
        self._cache = VersionCache()
        # Filled on the service's loop, emptied on the writer's (deque appends and pops are
        # atomic).
        self._waiting: deque[AppendRequest] = deque()
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._on_commit: OnCommit | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, on_commit: OnCommit) -> None:
        self._caller = asyncio.get_running_loop()
        self._on_commit = on_commit
        if not self._on_thread:
            self._writer_loop = self._caller
            self._wake = asyncio.Event()
            await self._connect()
            self._task = asyncio.create_task(self._serve(), name="event-log-writer")
            return
        connected: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run_thread, args=(connected,), name="event-log-writer", daemon=True
        )
        self._thread.start()
        try:
            await asyncio.wrap_future(connected)
        except BaseException:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            raise

    def _run_thread(self, connected: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        self._writer_loop = loop
        try:
            loop.run_until_complete(self._serve_on_thread(connected))
        finally:
            loop.close()

    async def _serve_on_thread(self, connected: concurrent.futures.Future[None]) -> None:
        self._wake = asyncio.Event()
        try:
            await self._connect()
        except BaseException as exc:
            connected.set_exception(exc)
            return
        connected.set_result(None)
        try:
            await self._serve()
        finally:
            if self._connection is not None:
                await self._connection.close()
                self._connection = None

    async def _connect(self) -> Any:
        import asyncpg

        if self._connection is None or self._connection.is_closed():
            self._connection = await asyncpg.connect(self._dsn)
        return self._connection

    def server_pid(self) -> int | None:
        """The server process of the appender's connection (its notifications come from it),
        or None while it has none."""
        connection = self._connection
        return None if connection is None else int(connection.get_server_pid())

    def submit(self, requests: list[AppendRequest]) -> None:
        self._waiting.extend(requests)
        self._signal()

    def _signal(self) -> None:
        """Wake the writer (from the service's loop)."""
        assert self._wake is not None
        assert self._writer_loop is not None
        if self._writer_loop is self._caller:
            self._wake.set()
        else:
            self._writer_loop.call_soon_threadsafe(self._wake.set)

    def _deliver(
        self, group: list[AppendRequest], outcome: Plan | Exception, seconds: float
    ) -> None:
        """Hand a transaction's outcome to the store, on the service's loop, in commit order
        (the loop runs callbacks in the order they were scheduled)."""
        if self._caller is self._writer_loop:
            self._committed(group, outcome, seconds)
        else:
            assert self._caller is not None
            self._caller.call_soon_threadsafe(self._committed, group, outcome, seconds)

    def _committed(
        self, group: list[AppendRequest], outcome: Plan | Exception, seconds: float
    ) -> None:
        assert self._on_commit is not None
        try:
            self._on_commit(group, outcome, seconds)
        except Exception:
            # The outcome is the store's to deliver; the next batch must still go.
            logger.exception("delivering the outcome of an append failed")

    async def _serve(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            await wake.wait()
            wake.clear()
            while self._waiting:
                started = time.perf_counter()
                group, outcome = await self._commit_next()
                self._deliver(group, outcome, time.perf_counter() - started)
            if self._stopping:
                return

    async def _commit_next(self) -> tuple[list[AppendRequest], Plan | Exception]:
        """One transaction: the append lock, then every request waiting by the time it is
        held (up to the batch limit), written and committed; the requests and the outcome.

        While the lock is held every other instance's appends wait, for as many round trips
        as this one makes under it, each of which waits its turn on this process's event
        loop: so there are three (the state, the rows, the commit), and the group is taken
        only once the lock is held, so that what arrived while it was waited for goes into
        this commit and not the next."""
        import asyncpg

        group: list[AppendRequest] | None = None
        try:
            connection = await self._connect()
            # One round trip: the transaction begins with the lock, waited for in the server.
            await connection.execute(_BEGIN_LOCKED)
            group = take_group(self._waiting, self._max_batch, _event_count)
            plan, head, chain = await self._write(connection, [r.events for r in group])
            await connection.execute("COMMIT")
        except BaseException as exc:
            self._cache.forget()
            if group is None:
                group = take_group(self._waiting, self._max_batch, _event_count)
            if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
                await self._discard()
                return group, LogUnavailable(f"the event log could not be written: {exc}")
            await self._roll_back()
            if isinstance(exc, Exception):
                return group, exc
            raise
        self._cache.committed(plan, head, chain)
        return group, plan

    async def _roll_back(self) -> None:
        connection = self._connection
        if connection is None or connection.is_closed():
            return
        try:
            if connection.is_in_transaction():
                await connection.execute("ROLLBACK")
        except Exception:
            await self._discard()

    async def probe(self) -> str | None:
        # The connection is the writer's alone; /health's reads show whether the server answers.
        return None

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        # Appends take only their advisory lock: other writers never wait for them.
        yield

    async def write_guarded(self, write: GuardedWrite) -> bool:
        """Make ``write`` in a transaction of its own, its guard's rows locked (``FOR UPDATE``)
        until it commits; False, nothing written, if the guard reads something else."""
        import asyncpg

        async with self._guarded_turn:
            try:
                if self._guarded is None or self._guarded.is_closed():
                    self._guarded = await asyncpg.connect(self._dsn)
                connection = self._guarded
                async with connection.transaction():
                    found = await connection.fetch(write.guard, *write.guard_parameters)
                    if [list(row) for row in found] != write.expected:
                        return False
                    for sql, rows in write.statements:
                        if len(rows) == 1:
                            await connection.execute(sql, *rows[0])
                        else:
                            await connection.executemany(sql, rows)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                if self._guarded is not None:
                    self._guarded.terminate()
                    self._guarded = None
                raise LogUnavailable(f"the write could not be made: {exc}") from exc
        return True

    async def _discard(self) -> None:
        if self._connection is not None:
            self._connection.terminate()
            self._connection = None

    async def _write(
        self, connection: Any, batch: Sequence[Sequence[NewEvent]]
    ) -> tuple[Plan, int, bytes | None]:
        """Plan and insert ``batch`` in the transaction holding the append lock."""
        keys = source_keys(batch)
        cache = self._cache
        # The cache holds each source's version as of its head: the state read asks for the
        # sources it does not hold and, where other writers moved the head since, reads what
        # they wrote, so that the cache holds as of the head again without a read per source.
        since = cache.head
        asked = [key for key in keys if not cache.holds(key)]
        head, head_chain, found, streams, sources, written = await connection.fetchrow(
            _STATE, [key[0] for key in asked], [key[1] for key in asked], since
        )
        if since is not None and head != since:
            if streams is None:
                cache.forget()
            else:
                moved = zip(zip(streams, sources, strict=True), written, strict=True)
                cache.catch_up(head, dict(moved))
        versions, missing = cache.begin(head, keys)
        read = dict(zip(asked, found, strict=True))
        versions.update((key, read[key]) for key in missing if key in read)
        rest = [key for key in missing if key not in read]
        if rest:
            # Too much was written since the cache's head: the sources it held are read.
            records = await connection.fetch(
                _VERSIONS, [key[0] for key in rest], [key[1] for key in rest]
            )
            versions.update({(r[0], r[1]): r[2] for r in records})
        ids = supplied_ids(batch)
        existing: dict[str, Event] = {}
        if ids:
            for record in await connection.fetch(
                f"SELECT {COLUMNS} FROM events WHERE event_id = ANY($1::text[])", list(ids)
            ):
                existing[record[5]] = event_from_row(record)
        # Read under the same lock as the head, so the chain follows commit order.
        chain = await self._head_chain(connection, head, head_chain)
        plan = plan_batch(
            batch,
            head=head,
            versions=versions,
            existing=existing,
            timestamp=utc_now(),
            chain=chain,
        )
        if plan.rows:
            columns = list(zip(*plan.rows, strict=True))
            # The notifications are delivered at commit, in commit order: the rows themselves
            # for other processes' feeds, or a wake-up (app/backends/postgres/notifications.py).
            notified = encode_notifications(plan.rows, with_rows=self._notify_events)
            await connection.execute(_INSERT, *columns, NOTIFY_CHANNEL, notified)
        return plan, head, chain

    async def _head_chain(self, connection: Any, head: int, found: bytes | None) -> bytes | None:
        """The chain value at ``head``: the one this appender committed last, else ``found``
        (read with the head), computed first if the head has none; None if the chain is off."""
        if not self._chained:
            return None
        known = self._cache.chain_at(head)
        if known is not None:
            return known
        if head == 0:
            return GENESIS
        return bytes(found) if found is not None else await self._fill_chain(connection)

    @staticmethod
    async def _fill_chain(connection: Any) -> bytes:
        """Chain values for the events appended while the chain was off (AUDIT_CHAIN=0),
        after the newest event that has one, in this transaction; the head's value."""
        last = await connection.fetchrow(
            "SELECT position, chain FROM events WHERE chain IS NOT NULL"
            " ORDER BY position DESC LIMIT 1"
        )
        after, previous = (last[0], bytes(last[1])) if last is not None else (0, GENESIS)
        logger.info("computing the chain values of the events after position %d", after)
        while rows := await connection.fetch(
            f"SELECT {COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT 5000",
            after,
        ):
            values = chain_rows(previous, rows)
            await connection.execute(
                "UPDATE events SET chain = u.chain FROM unnest($1::bigint[], $2::bytea[])"
                " AS u(position, chain) WHERE events.position = u.position",
                [row[0] for row in rows],
                values,
            )
            previous, after = values[-1], rows[-1][0]
        return previous

    async def close(self) -> None:
        if self._guarded is not None:
            await self._guarded.close()
            self._guarded = None
        if self._task is not None:
            self._stopping = True
            self._signal()
            await self._task
            self._task = None
        if self._thread is not None:
            self._stopping = True
            self._signal()
            # Its last outcomes were scheduled on this loop before it ended: they are
            # delivered before this await returns.
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._connection is not None:
            await self._connection.close()
            self._connection = None


def _event_count(request: AppendRequest) -> int:
    return len(request.events)
