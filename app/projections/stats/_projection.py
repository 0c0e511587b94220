"""The stats projection: event counters and the feed of recently finished work."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from sqlalchemy import BigInteger, Column, Index, String, Table, Text, delete, select
from sqlalchemy.ext.asyncio import AsyncConnection

from app.backends import upsert
from app.backends.schema import POSITION
from app.database import metadata
from app.eventlog import Event, EventFilter
from app.projections.agents import AGENT_STREAM
from app.projections.ingests import INGEST_STREAM

__all__ = [
    "EVENTS_TOTAL",
    "RECENT_KEEP",
    "STREAM_PREFIX",
    "StatsProjection",
    "stats_counters",
    "stats_recent",
]

EVENTS_TOTAL = "events.total"
#: Counter name prefix for the number of events of one stream.
STREAM_PREFIX = "events.stream:"
#: Finished ingests and agent runs kept for the ``recent`` feed.
RECENT_KEEP = 50

stats_counters = Table(
    "stats_counters",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

# One row per finished source (its latest finish), trimmed to the newest RECENT_KEEP.
stats_recent = Table(
    "stats_recent",
    metadata,
    Column("kind", String(16), primary_key=True),
    Column("source_id", String(200), primary_key=True),
    Column("position", POSITION, nullable=False),
    Column("completed_at", String(24), nullable=False),
    Column("status", String(50), nullable=False),
    Column("label", String(200), nullable=False),
    Column("message", Text, nullable=False),
    Index("ix_stats_recent_position", "position"),
)


#: The events that can finish something (see _finished): the others are passed over.
_FINISHING = frozenset(("complete", "failed"))


def _finished(event: Event) -> dict[str, Any] | None:
    """The ``recent`` row an event makes, if it finishes an ingest or an agent activity."""
    if event.stream == INGEST_STREAM and event.event == "complete":
        payload = event.payload_dict()
        kind, label = "ingest", str(payload.get("type", ""))
        status = str(payload.get("status", "error"))
    elif event.stream == AGENT_STREAM and event.event in ("complete", "failed"):
        payload = event.payload_dict()
        kind, label = "agent", str(payload.get("agent_name", ""))
        status = "completed" if event.event == "complete" else "failed"
    else:
        return None
    message = payload.get("message", payload.get("error", ""))
    return {
        "kind": kind,
        "source_id": event.source_id,
        "position": event.position,
        "completed_at": event.timestamp,
        "status": status[:50],
        "label": label[:200],
        "message": message if isinstance(message, str) else str(message),
    }


class StatsProjection:
    name = "stats"
    tables: Sequence[Table] = (stats_counters, stats_recent)
    source_filter = EventFilter()

    async def apply(self, connection: AsyncConnection, events: Sequence[Event]) -> None:
        deltas: dict[str, int] = {EVENTS_TOTAL: len(events)}
        for stream, count in Counter([event.stream for event in events]).items():
            deltas[STREAM_PREFIX + stream] = count
        finished: dict[tuple[str, str], dict[str, Any]] = {}
        for event in events:
            if event.event in _FINISHING:
                row = _finished(event)
                if row is not None:
                    finished[(row["kind"], row["source_id"])] = row
        await _add(connection, deltas)
        if finished:
            await upsert(
                connection, stats_recent, list(finished.values()), key=("kind", "source_id")
            )
            await _trim_recent(connection)


async def _add(connection: AsyncConnection, deltas: dict[str, int]) -> None:
    names = sorted(deltas)
    result = await connection.execute(
        select(stats_counters.c.name, stats_counters.c.value).where(
            stats_counters.c.name.in_(names)
        )
    )
    current = {row.name: row.value for row in result}
    await upsert(
        connection,
        stats_counters,
        [{"name": name, "value": current.get(name, 0) + deltas[name]} for name in names],
        key=("name",),
    )


async def _trim_recent(connection: AsyncConnection) -> None:
    # One statement, reading what the same transaction wrote: a step's writes may be made
    # later, together, by the log's writer (see app.projections.deferred).
    cutoff = (
        select(stats_recent.c.position)
        .order_by(stats_recent.c.position.desc())
        .offset(RECENT_KEEP - 1)
        .limit(1)
        .scalar_subquery()
    )
    await connection.execute(delete(stats_recent).where(stats_recent.c.position < cutoff))
