"""Alembic environment: async engine, the service's own metadata, one lock per upgrade."""

from __future__ import annotations

import asyncio
import logging.config

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

# Every module that defines tables, so that the metadata knows them all.
import app.eventlog.archives
import app.eventlog.tables
import app.jobs
import app.projections
import app.projections.snapshots  # noqa: F401
from app.backends import write_transaction
from app.config import load_settings
from app.database import create_engine, metadata

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = metadata

# Instances started together must not race each other through the same migration.
_MIGRATION_LOCK_KEY = 0x616374697669747A


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or load_settings().database.url


def _run(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=sqlite,
        compare_type=True,
        # SQLite's DDL is transactional too: one transaction for the whole upgrade, begun
        # IMMEDIATE (below), so a second instance waits for the write lock and then finds the
        # database already at head, instead of failing half-way with "database is locked" or
        # re-running a migration the first one committed.
        transactional_ddl=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
            )
        context.run_migrations()


async def _run_online() -> None:
    engine = create_engine(_url(), pool_size=1)
    try:
        async with engine.connect() as connection:
            connection = await write_transaction(connection)
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())
