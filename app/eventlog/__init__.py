"""The durable event log: the only code that writes the events table (through its backend's
appender, :mod:`app.backends`), and the reading, tailing and importing of it."""

from __future__ import annotations

from app.eventlog.filters import EventFilter
from app.eventlog.imports import ImportRefused, ImportResult, import_events
from app.eventlog.notify import LogEntry, LogFeed
from app.eventlog.store import EventStore, Page
from app.eventlog.tail import Truncated, replay_then_tail
from app.events import (
    AppendError,
    AppendResult,
    Event,
    EventIdReused,
    InvalidPayload,
    LogUnavailable,
    NewEvent,
    VersionConflict,
    canonical_decoded,
    canonical_payload,
    encode_event,
    parse_event_id,
)

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
    "Truncated",
    "VersionConflict",
    "canonical_decoded",
    "canonical_payload",
    "encode_event",
    "import_events",
    "parse_event_id",
    "replay_then_tail",
]
