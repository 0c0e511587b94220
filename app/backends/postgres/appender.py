"""PostgreSQL's side of appending: one dedicated connection, one transaction per
group-committed batch, under a transaction-scoped advisory lock.

The lock is taken before the head is read and held until commit, so commit order is position
order (see :mod:`app.backends.base`); other writers (projection steps, job leases) take no part
in it and never wait for appends. ``pg_notify`` at commit hands other processes' feeds the
rows (or wakes them).
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
                group = take_group(self._waiting, self._max_batch, _event_count)
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
                plan, head, chain = await self._write(connection, batch)
        except BaseException as exc:
            self._cache.forget()
            if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
                await self._discard()
                raise LogUnavailable(f"the event log could not be written: {exc}") from exc
            raise
        self._cache.committed(plan, head, chain)
        return plan

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
                f"SELECT {COLUMNS} FROM events WHERE event_id = ANY($1::text[])", list(ids)
            ):
                existing[record[5]] = event_from_row(record)
        # Read under the same lock as the head, so the chain follows commit order.
        chain = await self._head_chain(connection, head)
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
            await connection.execute(
                f"INSERT INTO events ({COLUMNS}) SELECT * FROM unnest($1::bigint[], $2::text[],"
                " $3::text[], $4::int[], $5::text[], $6::text[], $7::text[], $8::text[],"
                " $9::bytea[])",
                *columns,
            )
            # Delivered at commit, in commit order: the rows themselves for other processes'
            # feeds, or a wake-up (app/backends/postgres/notifications.py).
            await connection.execute(
                "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload",
                NOTIFY_CHANNEL,
                encode_notifications(plan.rows, with_rows=self._notify_events),
            )
        return plan, head, chain

    async def _head_chain(self, connection: Any, head: int) -> bytes | None:
        """The chain value at ``head``: the one this appender committed last, unless another
        instance moved the head since (then read, under the lock); None if off."""
        if not self._chained:
            return None
        known = self._cache.chain_at(head)
        if known is not None:
            return known
        if head == 0:
            return GENESIS
        found: bytes | None = await connection.fetchval(
            "SELECT chain FROM events WHERE position = $1", head
        )
        return found if found is not None else await self._fill_chain(connection)

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


def _event_count(request: AppendRequest) -> int:
    return len(request.events)
