"""The durable event log: the only code that writes the events table.

Its names are imported when first used, so that the log's writer process
(``app.eventlog.writer_process``), which needs only the appender's own modules, starts
without importing SQLAlchemy and the rest of the store.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.eventlog.envelope import (
        Event,
        InvalidPayload,
        NewEvent,
        canonical_decoded,
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
    "canonical_decoded",
    "canonical_payload",
    "encode_event",
    "import_events",
    "parse_event_id",
    "replay_then_tail",
]

_MODULES = {
    "Event": "envelope",
    "InvalidPayload": "envelope",
    "NewEvent": "envelope",
    "canonical_decoded": "envelope",
    "canonical_payload": "envelope",
    "encode_event": "envelope",
    "parse_event_id": "envelope",
    "AppendError": "errors",
    "EventIdReused": "errors",
    "LogUnavailable": "errors",
    "VersionConflict": "errors",
    "EventFilter": "filters",
    "ImportRefused": "imports",
    "ImportResult": "imports",
    "import_events": "imports",
    "LogEntry": "notify",
    "LogFeed": "notify",
    "AppendResult": "plan",
    "EventStore": "store",
    "Page": "store",
    "replay_then_tail": "tail",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
