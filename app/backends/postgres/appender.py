"""PostgreSQL's side of appending: one dedicated connection, one transaction per
group-committed batch, under a transaction-scoped advisory lock.

The lock is taken before the head is read and held until commit, so commit order is position
order (see :mod:`app.backends.base`); other writers (projection steps, job leases) take no part
in it and never wait for appends. ``pg_notify`` at commit hands other processes' feeds the
rows (or wakes them).

Every round trip under the lock holds every other instance's appends too, and waits for this
process's event loop to come round to its answer, so a transaction makes as few as it can:

- While nobody else appends (the last transaction found the head where this appender left
  it), a batch is planned on the appender's cache and sent in one statement, its own
  transaction: a session function takes the lock, checks that the head is still the
  expected one and writes; if another instance appended meanwhile it writes nothing and
  the batch goes the other way. No round trip waits under the lock.
- Otherwise four: ``BEGIN`` with the lock (one simple-protocol message), one statement
  reading all the batch needs, one writing the rows and their notifications, and
  ``COMMIT``. The reading statement is a statement of its own after the lock's: in READ
  COMMITTED each statement's snapshot is taken when it starts, so only a statement that
  starts once the lock is granted sees the previous holder's commit. It returns the events
  appended elsewhere since this appender's last commit (a range of positions), which bring
  the cache up to date, rather than each source's version.

The group of requests is taken before the lock is asked for: a transaction holds what was
waiting when it began, and what arrives while it waits for the lock goes into the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
    Row,
    SourceKey,
    VersionCache,
    event_from_row,
    plan_batch,
    source_keys,
    supplied_ids,
)

__all__ = ["APPEND_LOCK_KEY", "NOTIFY_CHANNEL", "PostgresAppender", "postgres_dsn"]

logger = logging.getLogger(__name__)

#: pg_advisory_xact_lock key for appends ("activity" in ASCII).
APPEND_LOCK_KEY = 0x6163746976697479
NOTIFY_CHANNEL = "activity_events"


def postgres_dsn(url: str) -> str:
    """A libpq-style DSN for asyncpg from a SQLAlchemy ``postgresql+asyncpg://`` URL."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresAppender:
    """One dedicated asyncpg connection; each batch is one transaction under the append lock.

    A task on the event loop forms the batches: whatever was submitted while a transaction
    was being committed goes into the next one. Guarded writes (projection steps) go over a
    second connection of their own: they take no lock appends wait for.
    """

    def __init__(
        self,
        url: str,
        *,
        max_batch_events: int = 2000,
        chain: bool = True,
        notify_events: bool = True,
    ) -> None:
        self._dsn = postgres_dsn(url)
        # Whether appends carry chain values (AUDIT_CHAIN).
        self._chained = chain
        # Whether a commit's notifications carry its rows (NOTIFY_EVENTS).
        self._notify_events = notify_events
        self._max_batch = max_batch_events
        self._connection: Any = None
        self._guarded: Any = None
        self._guarded_turn = asyncio.Lock()
        self._cache = VersionCache()
        # Whether the last transaction found the head where this appender had left it.
        self._alone = False
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
            connection = await asyncpg.connect(self._dsn)
            try:
                await connection.execute(_CREATE_APPEND_ALONE)
            except BaseException:
                connection.terminate()
                raise
            self._connection = connection
        return self._connection

    def server_pid(self) -> int | None:
        """The server process of the appender's connection (its notifications come from it),
        or None while it has none."""
        connection = self._connection
        return None if connection is None else int(connection.get_server_pid())

    def submit(self, requests: list[AppendRequest]) -> None:
        self._waiting.extend(requests)
        self._wake.set()

    async def _serve(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                group, outcome, seconds = await self._transaction()
                assert self._on_commit is not None
                try:
                    self._on_commit(group, outcome, seconds)
                except Exception:
                    # The outcome is the store's to deliver; the next batch must still go.
                    logger.exception("delivering the outcome of an append failed")
            if self._stopping:
                return

    def _take_group(self) -> list[AppendRequest]:
        return take_group(self._waiting, self._max_batch, _event_count)

    async def _transaction(self) -> tuple[list[AppendRequest], Plan | Exception, float]:
        """One transaction of the requests waiting: its group, and its plan or failure."""
        import asyncpg

        started = time.perf_counter()
        group = self._take_group()
        connection: Any = None
        try:
            connection = await self._connect()
            if self._alone:
                written = await self._write_alone(connection, [r.events for r in group])
                if written is not None:
                    return group, written, time.perf_counter() - started
            await connection.execute(_BEGIN_LOCKED)
            plan, head, chain = await self._write(connection, [r.events for r in group])
            await connection.execute("COMMIT")
        except BaseException as exc:
            self._cache.forget()
            if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
                await self._discard()
                failure = LogUnavailable(f"the event log could not be written: {exc}")
                failure.__cause__ = exc
                return group, failure, time.perf_counter() - started
            await self._roll_back(connection)
            if not isinstance(exc, Exception):
                raise
            return group, exc, time.perf_counter() - started
        self._cache.committed(plan, head, chain)
        return group, plan, time.perf_counter() - started

    async def _write_alone(
        self, connection: Any, batch: Sequence[Sequence[NewEvent]]
    ) -> Plan | None:
        """Write ``batch`` in one round trip, planned on what this appender committed last;
        None, nothing written, if another instance appended since or the batch needs what
        only the table holds (a source's version the cache lacks, supplied ids).

        One statement is one transaction: the server takes the lock, checks the head and
        writes, and no round trip waits under the lock.
        """
        cache = self._cache
        head = cache.head
        if head is None or supplied_ids(batch):
            return None
        versions, missing = cache.begin(head, source_keys(batch))
        chain = cache.chain_at(head) if self._chained else None
        if missing or (self._chained and chain is None):
            return None
        plan = plan_batch(
            batch, head=head, versions=versions, existing={}, timestamp=utc_now(), chain=chain
        )
        columns: list[Sequence[Any]] = list(zip(*plan.rows, strict=True)) or [
            [] for _ in Row._fields
        ]
        notifications = (
            encode_notifications(plan.rows, with_rows=self._notify_events) if plan.rows else []
        )
        if not await connection.fetchval(
            _APPEND_ALONE, head, *columns, NOTIFY_CHANNEL, notifications
        ):
            self._alone = False
            return None
        cache.committed(plan, head, chain)
        return plan

    async def _roll_back(self, connection: Any) -> None:
        """End a transaction that failed in this process's code; a connection that cannot
        is dropped (the server then rolls back)."""
        import asyncpg

        if connection is None or connection.is_closed() or not connection.is_in_transaction():
            return
        try:
            await connection.execute("ROLLBACK")
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
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
        keys = list(source_keys(batch))
        cache = self._cache
        cached_head = cache.head
        head = 0
        read_chain: bytes | None = None
        read: dict[SourceKey, int] = {}
        after: dict[SourceKey, int] = {}
        seen = 0
        existing: dict[str, Event] = {}
        ids = list(supplied_ids(batch))
        for record in await connection.fetch(
            _STATE_WITH_IDS if ids else _STATE,
            -1 if cached_head is None else cached_head,
            [key[0] for key in keys],
            [key[1] for key in keys],
            [cache.knows(key) for key in keys],
            self._chained,
            *([ids] if ids else []),
        ):
            kind = record[0]
            if kind == _HEAD:
                head, read_chain = record[1], record[9]
            elif kind == _AFTER:
                after[(record[2], record[3])] = record[4]
                seen += record[1]
            elif kind == _VERSION:
                read[(record[2], record[3])] = record[4] or 0
            else:
                existing[record[6]] = event_from_row(record[1:])
        # While nobody else appends, the next batch can go in one round trip.
        self._alone = head == cached_head
        if cached_head is not None and head != cached_head and seen == head - cached_head:
            # Every event appended elsewhere since this appender's last commit: the cache
            # follows them instead of being read again source by source.
            cache.caught_up(head, after, read_chain)
        versions, missing = cache.begin(head, set(keys))
        versions.update(read)
        if unread := [key for key in missing if key not in read]:
            # Events appended elsewhere that the statement did not return (more than it
            # reads, or some purged since): each source is read.
            versions.update(await self._versions(connection, unread))
        chain = await self._head_chain(connection, head, read_chain)
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
            # Delivered at commit, in commit order: the rows themselves for other processes'
            # feeds, or a wake-up (app/backends/postgres/notifications.py).
            await connection.execute(
                _INSERT_NOTIFY,
                *columns,
                NOTIFY_CHANNEL,
                encode_notifications(plan.rows, with_rows=self._notify_events),
            )
        return plan, head, chain

    @staticmethod
    async def _versions(connection: Any, keys: list[SourceKey]) -> dict[SourceKey, int]:
        records = await connection.fetch(
            "SELECT s.stream, s.source_id, (SELECT max(e.version) FROM events e"
            " WHERE e.stream = s.stream AND e.source_id = s.source_id)"
            " FROM unnest($1::text[], $2::text[]) AS s(stream, source_id)",
            [key[0] for key in keys],
            [key[1] for key in keys],
        )
        return {(r[0], r[1]): r[2] or 0 for r in records}

    async def _head_chain(
        self, connection: Any, head: int, read_chain: bytes | None
    ) -> bytes | None:
        """The chain value at ``head``: the one this appender committed last, unless another
        instance moved the head since (then the state statement read it, under the lock);
        None if off."""
        if not self._chained:
            return None
        known = self._cache.chain_at(head)
        if known is not None:
            return known
        if head == 0:
            return GENESIS
        return bytes(read_chain) if read_chain is not None else await self._fill_chain(connection)

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
            self._wake.set()
            await self._task
            self._task = None
        if self._connection is not None:
            await self._connection.close()
            self._connection = None


#: One simple-protocol message, one round trip: the transaction and the lock. The reads
#: come in a statement of their own, whose snapshot is taken once the lock is granted.
_BEGIN_LOCKED = f"BEGIN; SELECT pg_advisory_xact_lock({APPEND_LOCK_KEY})"

_HEAD, _AFTER, _VERSION, _EXISTING = 0, 1, 2, 3
#: The most events appended elsewhere that a transaction reads to bring its cache up to date;
#: past that, it reads each of its sources instead.
CATCH_UP = 5000
#: Everything a batch's plan needs, in one snapshot taken under the lock, as rows shaped like
#: the events table's after a kind ($1 is the head this appender last committed, -1 for
#: none): the head, and its chain value where the head has moved and the chain is on ($5);
#: the sources of the events appended since $1 by other writers, each with its newest version
#: and how many of those events it has, unless there are too many; the version of each
#: source ($2, $3) the cache does not hold ($4), or of every source where the events since
#: $1 are not read.
_STATE = f"""
WITH h AS (SELECT coalesce(max(position), 0) AS head FROM events)
SELECT {_HEAD}, h.head, NULL::text, NULL::text, NULL::int, NULL::text, NULL::text,
    NULL::text, NULL::text,
    CASE WHEN $5 AND h.head <> $1
        THEN (SELECT e.chain FROM events e WHERE e.position = h.head) END
FROM h
UNION ALL
(SELECT {_AFTER}, count(*), e.stream, e.source_id, max(e.version), NULL, NULL, NULL, NULL, NULL
FROM events e
WHERE e.position > $1 AND e.position <= $1 + {CATCH_UP} AND $1 >= 0
    AND (SELECT head FROM h) - $1 <= {CATCH_UP}
GROUP BY e.stream, e.source_id)
UNION ALL
SELECT {_VERSION}, NULL, k.stream, k.source_id,
    (SELECT max(e.version) FROM events e WHERE e.stream = k.stream AND e.source_id = k.source_id),
    NULL, NULL, NULL, NULL, NULL
FROM h, unnest($2::text[], $3::text[], $4::bool[]) AS k(stream, source_id, known)
WHERE NOT k.known OR $1 < 0 OR h.head - $1 > {CATCH_UP}
"""
#: The same and the events already holding the supplied ids ($6): a statement of its own, as
#: a plan made while the table was small scans it whole for ids, however large it grows.
_STATE_WITH_IDS = f"""{_STATE}UNION ALL
SELECT {_EXISTING}, {COLUMNS} FROM events WHERE event_id = ANY($6::text[])
"""

#: The rows, and the notifications PostgreSQL delivers when they commit.
_INSERT_NOTIFY = f"""
WITH written AS (
    INSERT INTO events ({COLUMNS}) SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[],
        $4::int[], $5::text[], $6::text[], $7::text[], $8::text[], $9::bytea[])
)
SELECT pg_notify($10, payload) FROM unnest($11::text[]) AS payload
"""


#: A session's own function (dropped with its connection): one batch planned on the head
#: $1, written only if the head is still $1 once the lock is granted. Each statement of a
#: VOLATILE function takes a snapshot of its own, so the head is read after the lock.
_CREATE_APPEND_ALONE = f"""
CREATE FUNCTION pg_temp.append_alone(bigint, bigint[], text[], text[], int[], text[], text[],
    text[], text[], bytea[], text, text[]) RETURNS boolean VOLATILE LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock({APPEND_LOCK_KEY});
    IF (SELECT coalesce(max(position), 0) FROM events) <> $1 THEN
        RETURN false;
    END IF;
    INSERT INTO events ({COLUMNS}) SELECT * FROM unnest($2, $3, $4, $5, $6, $7, $8, $9, $10);
    PERFORM pg_notify($11, payload) FROM unnest($12) AS payload;
    RETURN true;
END
$$
"""
_APPEND_ALONE = "SELECT pg_temp.append_alone($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"


def _event_count(request: AppendRequest) -> int:
    return len(request.events)
