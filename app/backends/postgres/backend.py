"""The PostgreSQL backend: several instances on one server, appends serialised by an advisory
lock, other processes woken by NOTIFY."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, String, Table, Text, cast, func, literal, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.dml import Insert

from app.backends.base import Appender, Backend, Listener
from app.backends.postgres.appender import (
    APPEND_LOCK_KEY,
    NOTIFY_CHANNEL,
    PostgresAppender,
    postgres_dsn,
)
from app.backends.postgres.listener import PostgresListener

if TYPE_CHECKING:
    from app.config import DatabaseSettings
    from app.events.envelope import Event

__all__ = ["PostgresBackend"]


class PostgresBackend(Backend):
    dialect = "postgresql"
    scheme = "postgresql+asyncpg://"

    def check(self, settings: DatabaseSettings) -> None:
        """Nothing to check before connecting: the server says what is wrong."""

    def prepare(self) -> None:
        """Nothing to prepare: the database is the server's."""

    def create_engine(self, *, pool_size: int) -> AsyncEngine:
        return create_async_engine(
            self.url,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
            pool_recycle=1800,
        )

    def appender(self, settings: DatabaseSettings) -> Appender:
        return PostgresAppender(
            self.url,
            max_batch_events=settings.max_batch_events,
            chain=settings.audit_chain,
            notify_events=settings.notify_events,
        )

    def listener(
        self,
        on_head: Callable[[int], None],
        appender: Appender,
        on_events: Callable[[Sequence[Event]], None] | None = None,
    ) -> Listener:
        own = appender.server_pid if isinstance(appender, PostgresAppender) else None
        return PostgresListener(
            postgres_dsn(self.url), NOTIFY_CHANNEL, on_head, own=own, on_events=on_events
        )

    async def snapshot_transaction(self, connection: AsyncConnection) -> AsyncConnection:
        # READ COMMITTED takes a new snapshot per statement.
        return await connection.execution_options(isolation_level="REPEATABLE READ")

    async def database_bytes(self, connection: AsyncConnection) -> int | None:
        result = await connection.execute(text("SELECT pg_database_size(current_database())"))
        return int(result.scalar_one())

    async def lock_log(self, connection: AsyncConnection) -> None:
        await connection.execute(
            text("SELECT pg_advisory_xact_lock(:key)"), {"key": APPEND_LOCK_KEY}
        )

    async def announce(self, connection: AsyncConnection, head: int) -> None:
        await connection.execute(
            text("SELECT pg_notify(:channel, :head)"),
            {"channel": NOTIFY_CHANNEL, "head": str(head)},
        )

    def insert(self, table: Table) -> Insert:
        return postgresql.insert(table)

    def json_quoted(self, value: ColumnElement[str]) -> ColumnElement[str]:
        return cast(func.to_json(value), Text)

    def formatted(self, template: str, *values: ColumnElement[Any]) -> ColumnElement[str]:
        # format() knows %s alone, and writes an integer as printf's %d would.
        return func.format(literal(template.replace("%d", "%s"), String), *values, type_=String)
