"""SQLite's side of appending: one connection, one transaction per group-committed batch.

SQLite's single write lock (``BEGIN IMMEDIATE``) serialises appends, so commit order is
position order (see :mod:`app.backends.base`). The writer is used from one thread at a time,
and the same code runs in the service's process (a thread) or in a process of its own.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from app.backends.base import GuardedWrite
from app.backends.sqlite.checkpoints import Checkpointer
from app.backends.sqlite.pragmas import SQLITE_PRAGMAS
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

__all__ = [
    "INSERT_BLOCKS",
    "MIN_FREE_BYTES",
    "SqliteWriter",
    "WriterOptions",
    "blocks_within",
    "insert_rows",
]

logger = logging.getLogger(__name__)

_ROW_PARAMETERS = COLUMNS.count(",") + 1
_ROW_MARKS = "(" + ", ".join("?" * _ROW_PARAMETERS) + ")"
_INSERT = f"INSERT INTO events ({COLUMNS}) VALUES {_ROW_MARKS}"
#: Rows per multi-row INSERT, largest first (see insert_rows), and their statements.
INSERT_BLOCKS = (1024, 256)
# OR ROLLBACK: a multi-row statement that may fail part way (a unique index) otherwise keeps a
# statement journal, a temporary file every page the statement changes is first copied into,
# so that the statement alone can be undone, doubling the bytes a commit writes. A failure
# here ends the whole transaction instead, which the writer rolls back in any case.
_BLOCK_INSERT = {
    size: f"INSERT OR ROLLBACK INTO events ({COLUMNS}) VALUES " + ", ".join([_ROW_MARKS] * size)
    for size in INSERT_BLOCKS
}


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

    ``executemany`` lets go of the GIL around each row's step and has to win it back every
    time, from an event loop that is busy preparing the next requests when the writer runs
    on its thread; a block is one step and one wait. Below a block, ``executemany`` stays:
    it costs less CPU per row, and small commits are the ones in-process appends make.

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


# Less free space than this on the SQLite file's filesystem reads as a full disk in /health.
MIN_FREE_BYTES = 1024 * 1024


class WriterOptions(NamedTuple):
    """How a writer is made and served, whichever appender runs it: the thread's
    (:mod:`app.backends.sqlite.thread`) or the process's, which passes them to its child as
    arguments (:meth:`arguments`, :meth:`from_arguments`)."""

    path: Path
    busy_timeout_ms: int = 10_000
    #: Events per transaction at most (``APPEND_MAX_BATCH``).
    max_batch: int = 2000
    cache_kib: int = 64 * 1024
    #: Whether appends carry chain values (``AUDIT_CHAIN``).
    chain: bool = True

    def writer(self) -> SqliteWriter:
        return SqliteWriter(
            self.path,
            busy_timeout_ms=self.busy_timeout_ms,
            cache_kib=self.cache_kib,
            chain=self.chain,
        )

    def arguments(self) -> list[str]:
        return [
            str(self.path),
            str(self.busy_timeout_ms),
            str(self.max_batch),
            str(self.cache_kib),
            str(int(self.chain)),
        ]

    @classmethod
    def from_arguments(cls, arguments: Sequence[str]) -> WriterOptions:
        path, busy_ms, max_batch, cache_kib, chain = arguments
        return cls(Path(path), int(busy_ms), int(max_batch), int(cache_kib), chain == "1")


class SqliteWriter:
    """The SQLite side of appending: one connection, one transaction per batch.

    Used from one thread at a time: the thread appender's own thread
    (:mod:`app.backends.sqlite.thread`) or the writer process's main thread
    (:mod:`app.backends.sqlite.process`), both serving it with one loop
    (:mod:`app.backends.sqlite.serve`).
    """

    def __init__(
        self, path: Path, *, busy_timeout_ms: int, cache_kib: int, chain: bool = True
    ) -> None:
        self.path = path
        #: Whether appends carry chain values (AUDIT_CHAIN).
        self.chain = chain
        self.busy_ms = busy_timeout_ms
        self._cache_kib = cache_kib
        self._connection: sqlite3.Connection | None = None
        self._cache = VersionCache()
        self._blocks: tuple[int, ...] = ()
        self._checkpoints: Checkpointer | None = None

    def connect(self) -> None:
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for pragma in SQLITE_PRAGMAS:
            connection.execute(pragma)
        connection.execute(f"PRAGMA busy_timeout={self.busy_ms}")
        # Only this connection writes, so its page cache stays valid from one transaction to
        # the next: the index pages an append touches are found in memory, not re-read.
        connection.execute(f"PRAGMA cache_size=-{self._cache_kib}")
        # The WAL is copied into the database beside the commits, not inside them
        # (app/backends/sqlite/checkpoints.py).
        connection.execute("PRAGMA wal_autocheckpoint=0")
        self._blocks = blocks_within(
            connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER), sqlite3.sqlite_version_info
        )
        self._connection = connection
        self._checkpoints = Checkpointer(self.path)
        self._checkpoints.start()

    def _between(self, connection: sqlite3.Connection) -> None:
        """Between two transactions: copy the rest of the WAL into the database if the
        checkpointer asks, so that the next transaction starts the WAL over."""
        if self._checkpoints is not None and self._checkpoints.due():
            try:
                connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:
                logger.debug("WAL checkpoint failed: %s", exc)
            finally:
                self._checkpoints.copied()

    def restarting(self) -> bool:
        """Whether the WAL is about to start over: writes that can wait should, so that
        what the writer copies first is small (app/backends/sqlite/checkpoints.py)."""
        return self._checkpoints is not None and self._checkpoints.restarting()

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
        self._between(connection)
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
            chain = self._head_chain(connection, head)
            plan = plan_batch(
                batch,
                head=head,
                versions=versions,
                existing=existing,
                timestamp=utc_now(),
                chain=chain,
            )
            if plan.rows:
                insert_rows(connection, plan.rows, self._blocks)
            connection.execute("COMMIT")
        except BaseException:
            self._cache.forget()
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        self._cache.committed(plan, head, chain)
        return plan

    def _head_chain(self, connection: sqlite3.Connection, head: int) -> bytes | None:
        """The chain value at ``head``: the one this writer committed last, unless another
        writer moved the head since (then read, under the write lock); None if off."""
        if not self.chain:
            return None
        known = self._cache.chain_at(head)
        if known is not None:
            return known
        if head == 0:
            return GENESIS
        found: bytes | None = connection.execute(
            "SELECT chain FROM events WHERE position = ?", (head,)
        ).fetchone()[0]
        return found if found is not None else self._fill_chain(connection)

    @staticmethod
    def _fill_chain(connection: sqlite3.Connection) -> bytes:
        """Chain values for the events appended while the chain was off (AUDIT_CHAIN=0),
        after the newest event that has one, in this transaction; the head's value."""
        last = connection.execute(
            "SELECT position, chain FROM events WHERE chain IS NOT NULL"
            " ORDER BY position DESC LIMIT 1"
        ).fetchone()
        after, previous = last if last is not None else (0, GENESIS)
        logger.info("computing the chain values of the events after position %d", after)
        while rows := connection.execute(
            f"SELECT {COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT 5000",
            (after,),
        ).fetchall():
            values = chain_rows(previous, rows)
            connection.executemany(
                "UPDATE events SET chain = ? WHERE position = ?",
                [(value, row[0]) for row, value in zip(rows, values, strict=True)],
            )
            previous, after = values[-1], rows[-1][0]
        return previous

    def write_guarded(self, write: GuardedWrite) -> bool:
        """Run ``write`` in one transaction of its own; False (nothing written) if its guard
        did not read what it expected. Raises :class:`LogUnavailable` (nothing written) if
        the database refuses a statement."""
        connection = self._connection
        assert connection is not None, "SqliteWriter.connect() was not called"
        self._between(connection)
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
                f"SELECT {COLUMNS} FROM events WHERE event_id IN ({marks})", chunk
            ):
                found[row[5]] = event_from_row(row)
        return found

    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.stop()
            self._checkpoints = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None
