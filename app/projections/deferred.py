"""A projection step's writes, kept to be made later in one transaction by the log's writer.

Where the log's appender and the projections share one write lock (SQLite), a step that writes
through a connection of its own holds that lock, and with it every append, for as long as
its transaction lasts, and each statement it makes on the event loop first waits for the
loop to come round to it, which under load holds appends for many milliseconds per step.
:class:`DeferredWrites` stands in for the step's connection instead: its reads go to a
connection already reading at the checkpoints the step started from, and its writes are
compiled to SQL and rows of parameters and kept. The runner then hands them to the appender
(:meth:`~app.eventlog.EventStore.write_guarded`), which makes them in one transaction
(there, between two of its own), guarded by the checkpoints: if another process moved one in the
meantime, nothing is written and the step is taken again under the lock.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Executable
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement

from app.database.statements import compile_write

__all__ = ["DeferredWrites", "compile_write"]


class DeferredWrites:
    """The part of :class:`AsyncConnection` a projection step uses (``dialect``,
    ``sync_engine``, by which :func:`~app.backends.backend_of` finds its backend, and
    ``execute``): reads go to ``reads``, writes are compiled and kept in ``statements``."""

    def __init__(self, reads: AsyncConnection) -> None:
        self._reads = reads
        self.dialect = reads.dialect
        self.sync_engine = reads.sync_engine
        self.statements: list[tuple[str, list[list[Any]]]] = []

    async def execute(self, statement: Executable, parameters: Any = None) -> Any:
        if getattr(statement, "is_select", False):
            return await self._reads.execute(statement, parameters)
        self.statements.append(
            compile_write(cast(ClauseElement, statement), parameters, self.dialect)
        )
        return None
