"""The events table: the log itself, and the only table the append path writes."""

from __future__ import annotations

from sqlalchemy import Column, Index, Integer, LargeBinary, String, Table, Text

from app.backends.schema import POSITION
from app.database import metadata

__all__ = ["EVENT_COLUMNS", "MAX_POSITION", "MAX_VERSION", "events"]

#: The largest position the column holds (a signed 64-bit integer on both databases).
MAX_POSITION = 2**63 - 1
#: The largest version the column holds (INTEGER: 32 bits on PostgreSQL); a request naming a
#: larger one is refused where it is parsed, never carried to the writer.
MAX_VERSION = 2**31 - 1

events = Table(
    "events",
    metadata,
    # Assigned by the appender under the log's write lock, so it is gapless and commit-ordered.
    Column("position", POSITION, primary_key=True, autoincrement=False),
    Column("stream", String(100), nullable=False),
    Column("source_id", String(200), nullable=False),
    Column("version", Integer, nullable=False),
    Column("event", String(100), nullable=False),
    Column("event_id", String(36), nullable=False, unique=True),
    # RFC 3339 text as sent on the wire: fixed width, so text order is time order.
    Column("timestamp", String(24), nullable=False),
    # Canonical compact JSON text (not JSONB, which would reorder keys).
    Column("payload", Text, nullable=False),
    # SHA-256 of the previous event's chain value and this event's canonical bytes
    # (app/events/chain.py), set by the appender under the write lock. Empty only for events
    # appended with AUDIT_CHAIN=0, until an appender with the chain on fills them in.
    Column("chain", LargeBinary(32), nullable=True),
    Index("uq_events_stream_source_id_version", "stream", "source_id", "version", unique=True),
    Index("ix_events_source_id_position", "source_id", "position"),
    Index("ix_events_stream_position", "stream", "position"),
    Index("ix_events_event_position", "event", "position"),
)

#: An event's columns, in :class:`~app.events.envelope.Event`'s field order: what every read of
#: whole events selects (the chain value, when wanted, goes after them).
EVENT_COLUMNS = (
    events.c.position,
    events.c.stream,
    events.c.source_id,
    events.c.version,
    events.c.event,
    events.c.event_id,
    events.c.timestamp,
    events.c.payload,
)
