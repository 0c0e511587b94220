"""The durable event log: the only code that writes the events table."""

from __future__ import annotations

from app.eventlog.envelope import (
    Event,
    InvalidPayload,
    NewEvent,
    canonical_payload,
    encode_event,
    parse_event_id,
)
from app.eventlog.errors import AppendError, EventIdReused, LogUnavailable, VersionConflict
from app.eventlog.filters import EventFilter
from app.eventlog.imports import ImportRefused, ImportResult, import_events
from app.eventlog.notify import LogEntry, LogFeed
from app.eventlog.plan import AppendResult
from app.eventlog.store import EventStore, Page
from app.eventlog.tail import replay_then_tail

__all__ = [
    "AppendError",
    "AppendResult",
    "Event",
    "EventFilter",
    "EventIdReused",
    "EventStore",
    "ImportRefused",
    "ImportResult",
    "InvalidPayload",
    "LogEntry",
    "LogFeed",
    "LogUnavailable",
    "NewEvent",
    "Page",
    "VersionConflict",
    "canonical_payload",
    "encode_event",
    "import_events",
    "parse_event_id",
    "replay_then_tail",
]
