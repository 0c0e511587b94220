"""The database the log and the read models share: its schema's metadata, engines, and
migrations (Alembic, ``migrations/``). What differs by database is its backend's
(:mod:`app.backends`)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine

from app.backends import backend_for

__all__ = ["create_engine", "metadata", "upgrade_database"]

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

_PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An async engine with its backend's connection settings applied on every connection."""
    return backend_for(url).create_engine(pool_size=pool_size)


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
    backend_for(url).prepare()
    # Alembic's async env runs its own event loop, so it goes to a thread.
    await asyncio.to_thread(_upgrade, url)
