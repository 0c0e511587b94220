"""The SQLite backend: a file, WAL, one write lock for everything, and the log's writer
either in a process of its own or on a thread (``SQLITE_APPENDER``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Select, String, Table, event, func, literal
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.dml import Insert

from app.backends.base import Appender, Backend
from app.backends.sqlite.pragmas import SQLITE_PRAGMAS
from app.backends.sqlite.process import ProcessAppender
from app.backends.sqlite.thread import ThreadAppender
from app.backends.sqlite.writer import WriterOptions

if TYPE_CHECKING:
    from app.config import DatabaseSettings

__all__ = ["APPENDERS", "SqliteBackend"]

#: Where a SQLite log's appends are written (``SQLITE_APPENDER``): from a process of its own
#: (no GIL shared with the event loop), or from a thread of the service's process.
APPENDERS: dict[str, type[ProcessAppender] | type[ThreadAppender]] = {
    "process": ProcessAppender,
    "thread": ThreadAppender,
}

#: Pages of fewer rows than this are fetched through SQLAlchemy's result: compiling the
#: statement for the driver costs more than a short page's rows save.
_RAW_MIN_ROWS = 500


class SqliteBackend(Backend):
    dialect = "sqlite"
    scheme = "sqlite+aiosqlite://"

    @property
    def path(self) -> Path:
        """The database file (:meth:`check` refuses a URL without one)."""
        database = make_url(self.url).database
        if not database or database == ":memory:":
            raise ValueError(
                "DATABASE_URL must name a SQLite file (sqlite+aiosqlite:///path/to/events.db): "
                "an in-memory database cannot be shared by the service's connections"
            )
        return Path(database)

    def check(self, settings: DatabaseSettings) -> None:
        self.path  # noqa: B018 (raises for a URL without a file)
        self._appender_kind(settings)

    def missing(self) -> str | None:
        path = self.path
        return None if path.exists() else f"no database at {path}"

    def prepare(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def create_engine(self, *, pool_size: int) -> AsyncEngine:
        self.prepare()
        engine = create_async_engine(self.url, pool_size=pool_size, max_overflow=pool_size)
        _configure(engine)
        return engine

    def appender(self, settings: DatabaseSettings) -> Appender:
        return self._appender_kind(settings)(
            WriterOptions(
                self.path,
                busy_timeout_ms=int(settings.busy_timeout_seconds * 1000),
                max_batch=settings.max_batch_events,
                chain=settings.audit_chain,
            )
        )

    @staticmethod
    def _appender_kind(settings: DatabaseSettings) -> type[ProcessAppender | ThreadAppender]:
        kind = APPENDERS.get(settings.sqlite_appender)
        if kind is None:
            choices = " or ".join(f'"{name}"' for name in APPENDERS)
            raise ValueError(f"SQLITE_APPENDER must be {choices}, got {settings.sqlite_appender!r}")
        return kind

    async def snapshot_transaction(self, connection: AsyncConnection) -> AsyncConnection:
        # A deferred transaction in WAL mode reads one snapshot from its first read on.
        return connection

    async def database_bytes(self, connection: AsyncConnection) -> int | None:
        path = self.path
        return sum(
            candidate.stat().st_size
            for candidate in (path, path.with_name(path.name + "-wal"))
            if candidate.exists()
        )

    async def write_transaction(self, connection: AsyncConnection) -> AsyncConnection:
        # A transaction that reads first and writes later would fail with SQLITE_BUSY on a
        # lock another writer took in between, instead of waiting for it: take it at BEGIN.
        return await connection.execution_options(sqlite_begin="IMMEDIATE")

    async def lock_log(self, connection: AsyncConnection) -> None:
        """Nothing more to take: the write transaction's ``BEGIN IMMEDIATE`` took SQLite's
        write lock, which is the one appends take."""

    async def announce(self, connection: AsyncConnection, head: int) -> None:
        """Nothing to tell: SQLite has no notifications; other processes' tails find the
        new rows by their poll."""

    def insert(self, table: Table) -> Insert:
        return sqlite.insert(table)

    def json_quoted(self, text: ColumnElement[str]) -> ColumnElement[str]:
        return func.json_quote(text, type_=String)

    def formatted(self, template: str, *values: ColumnElement[Any]) -> ColumnElement[str]:
        return func.printf(literal(template, String), *values, type_=String)

    async def fetch_rows(
        self, connection: AsyncConnection, query: Select[Any], limit: int
    ) -> Sequence[Sequence[Any]]:
        """A long page straight from aiosqlite's cursor: building SQLAlchemy's result rows
        costs a large share of a replay's time per event. The query is compiled by
        SQLAlchemy all the same; the log's columns have no result processing on SQLite, so
        the values are those SQLAlchemy would give. A short page keeps SQLAlchemy's result,
        whose cached compilation costs less than compiling for the driver."""
        if limit < _RAW_MIN_ROWS:
            return await super().fetch_rows(connection, query, limit)
        compiled = query.compile(
            dialect=connection.dialect, compile_kwargs={"render_postcompile": True}
        )
        values = compiled.construct_params()
        parameters = [values[name] for name in compiled.positiontup or ()]
        driver = (await connection.get_raw_connection()).driver_connection
        assert driver is not None
        try:
            async with driver.execute(compiled.string, parameters) as cursor:
                rows: Sequence[Sequence[Any]] = await cursor.fetchall()
        except sqlite3.Error as exc:
            # Raised as SQLAlchemy raises it: callers tell a database that is away by
            # DBAPIError (the API answers 503, a tail retries).
            wrapped = DBAPIError.instance(
                compiled.string, parameters, exc, sqlite3.Error, dialect=connection.dialect
            )
            assert isinstance(wrapped, DBAPIError)
            raise wrapped from exc
        return rows


def _configure(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so that BEGIN is ours to emit: a write
        # transaction must start with BEGIN IMMEDIATE (see write_transaction).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")
