"""Engines, connection settings and migrations shared by the log and the projections."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, MetaData, String, Table, Text, cast, event, func
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from app.sqlite import SQLITE_PRAGMAS

__all__ = [
    "SQLITE_PRAGMAS",
    "create_engine",
    "is_sqlite",
    "metadata",
    "sqlite_path",
    "upgrade_database",
    "upsert",
    "write_transaction",
]

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def is_sqlite(url: str | URL) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str | URL) -> Path | None:
    """The database file of a SQLite URL, or None for an in-memory database."""
    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    return Path(database)


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An async engine with this service's connection settings applied on every connection."""
    if is_sqlite(url):
        path = sqlite_path(url)
        if path is None:
            raise ValueError("an in-memory SQLite database cannot be shared; give a file path")
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size)
        _configure_sqlite(engine)
        return engine
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, pool_recycle=1800
    )


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so that BEGIN is ours to emit: a write
        # transaction must start with BEGIN IMMEDIATE, or a reader that later writes fails with
        # SQLITE_BUSY instead of waiting for the lock.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


async def write_transaction(connection: AsyncConnection) -> AsyncConnection:
    """Mark ``connection`` so its next transaction takes SQLite's write lock up front."""
    return await connection.execution_options(sqlite_begin="IMMEDIATE")


async def upsert(
    connection: AsyncConnection,
    table: Table,
    rows: Sequence[dict[str, Any]],
    *,
    key: Sequence[str],
    update: bool = True,
) -> None:
    """Insert ``rows``; on a clash of ``key``, overwrite the other columns (or keep the row)."""
    if not rows:
        return
    insert = (
        sqlite.insert(table) if connection.dialect.name == "sqlite" else postgresql.insert(table)
    )
    columns = [name for name in rows[0] if name not in key]
    if update and columns:
        statement = insert.on_conflict_do_update(
            index_elements=list(key), set_={name: insert.excluded[name] for name in columns}
        )
    else:
        statement = insert.on_conflict_do_nothing(index_elements=list(key))
    await connection.execute(statement, list(rows))


def json_quoted(dialect: str, text: ColumnElement[str]) -> ColumnElement[str]:
    """``text`` as a JSON string, quoted by the database (SQLite's ``json_quote``,
    PostgreSQL's ``to_json``): for frames the database builds (``app.api.sse.SQL_FRAMES``),
    used where the log checked that it escapes as msgspec does (``EventStore.open``)."""
    if dialect == "sqlite":
        return func.json_quote(text, type_=String)
    return cast(func.to_json(text), Text)


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config(str(_PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(_PROJECT_ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    return config


# Alembic keeps the running migration's context in a module-level global, so two upgrades in
# one process (two services opened at once) must take turns; other processes are kept apart by
# the database (migrations/env.py).
_UPGRADE_LOCK = threading.Lock()


def _upgrade(url: str) -> None:
    from alembic import command

    with _UPGRADE_LOCK:
        command.upgrade(_alembic_config(url), "head")


async def upgrade_database(url: str) -> None:
    """Apply every pending migration (idempotent; safe to run on each start)."""
    path = sqlite_path(url) if is_sqlite(url) else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    # Alembic's async env runs its own event loop, so it goes to a thread.
    await asyncio.to_thread(_upgrade, url)
