"""What a projection is, and the checkpoint table every projection shares."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import Column, String, Table
from sqlalchemy.ext.asyncio import AsyncConnection

from app.backends.schema import POSITION
from app.database import metadata
from app.eventlog import Event, EventFilter

__all__ = ["Projection", "checkpoints"]

# One row per projection: the position up to which its rows reflect the log. Written in the
# same transaction as the rows, so a crash can never apply an event twice or skip one.
checkpoints = Table(
    "projection_checkpoints",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("position", POSITION, nullable=False),
    Column("updated_at", String(24), nullable=False),
)


class Projection(Protocol):
    """A read model folded from the log."""

    #: Stable name: the checkpoint's key and the command line's argument.
    name: str
    #: The tables holding the read model (emptied by a rebuild).
    tables: Sequence[Table]
    #: The events it folds; the rest only move its checkpoint.
    source_filter: EventFilter

    async def apply(self, connection: AsyncConnection, events: Sequence[Event]) -> None:
        """Fold ``events`` (in position order) into the tables, inside the caller's
        transaction."""
        ...
