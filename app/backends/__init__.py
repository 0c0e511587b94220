"""The databases the service runs on: one package each (``sqlite/``, ``postgres/``) behind one
interface (:class:`~app.backends.base.Backend`), chosen here from ``DATABASE_URL``.

Nothing outside this package asks which database it is on: it holds a backend (the event
store's, or :func:`backend_of` a connection) and calls it. Importing this package imports no
backend: the SQLite writer process imports its own backend's modules alone.
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from app.backends.base import Appender, AppendRequest, Backend, GuardedWrite, Listener

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from app.config import DatabaseSettings

__all__ = [
    "AppendRequest",
    "Appender",
    "Backend",
    "GuardedWrite",
    "Listener",
    "backend_for",
    "backend_of",
    "check_database",
    "upsert",
    "write_transaction",
]

#: Each backend's ``DATABASE_URL`` scheme, SQLAlchemy dialect, and class.
_BACKENDS = (
    ("sqlite+aiosqlite://", "sqlite", "app.backends.sqlite.backend", "SqliteBackend"),
    ("postgresql+asyncpg://", "postgresql", "app.backends.postgres.backend", "PostgresBackend"),
)


def _load(module: str, name: str) -> type[Backend]:
    found: type[Backend] = getattr(importlib.import_module(module), name)
    return found


def backend_for(url: str) -> Backend:
    """The backend ``url`` names. Raises ValueError for a URL no backend serves."""
    for scheme, _, module, name in _BACKENDS:
        if url.startswith(scheme):
            return _load(module, name)(url)
    schemes = " or ".join(scheme for scheme, *_ in _BACKENDS)
    raise ValueError(f"DATABASE_URL must start with {schemes}, got {url.split('://')[0]!r}")


_of_engine: weakref.WeakKeyDictionary[Any, Backend] = weakref.WeakKeyDictionary()


def backend_of(bind: AsyncConnection | AsyncEngine) -> Backend:
    """The backend of a connection or engine (for code handed one, not the store)."""
    engine = bind.sync_engine
    found = _of_engine.get(engine)
    if found is None:
        dialect = bind.dialect.name
        served = [entry for entry in _BACKENDS if entry[1] == dialect]
        if not served:
            raise ValueError(f"no backend serves the {dialect!r} dialect")
        _, _, module, name = served[0]
        url = engine.url.render_as_string(hide_password=False)
        found = _of_engine[engine] = _load(module, name)(url)
    return found


def check_database(settings: DatabaseSettings) -> None:
    """Raise ValueError, in words for the user, unless a backend can serve ``settings``
    (SQLAlchemy's ArgumentError for a URL it cannot parse at all)."""
    from sqlalchemy.engine import make_url

    backend = backend_for(settings.url)
    make_url(settings.url)  # a malformed URL, a port that is not a number
    backend.check(settings)


async def write_transaction(connection: AsyncConnection) -> AsyncConnection:
    """See :meth:`Backend.write_transaction`."""
    return await backend_of(connection).write_transaction(connection)


async def upsert(
    connection: AsyncConnection,
    table: Table,
    rows: Sequence[dict[str, Any]],
    *,
    key: Sequence[str],
    update: bool = True,
) -> None:
    """See :meth:`Backend.upsert`."""
    await backend_of(connection).upsert(connection, table, rows, key=key, update=update)
