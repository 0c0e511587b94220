"""Events as the log holds them: the envelope, the errors of appending, and the planning of
an append (positions, versions, idempotent retries).

Free of the database and the web framework: the log's writer process imports only this and
its backend's writer.
"""

from __future__ import annotations

from app.events.envelope import (
    MAX_PAYLOAD_DEPTH,
    Event,
    InvalidPayload,
    NewEvent,
    canonical_decoded,
    canonical_payload,
    decode_event,
    encode_event,
    format_timestamp,
    new_event_id,
    new_event_ids,
    parse_event_id,
    utc_now,
)
from app.events.errors import AppendError, EventIdReused, LogUnavailable, VersionConflict
from app.events.plan import AppendResult, Plan

__all__ = [
    "MAX_PAYLOAD_DEPTH",
    "AppendError",
    "AppendResult",
    "Event",
    "EventIdReused",
    "InvalidPayload",
    "LogUnavailable",
    "NewEvent",
    "Plan",
    "VersionConflict",
    "canonical_decoded",
    "canonical_payload",
    "decode_event",
    "encode_event",
    "format_timestamp",
    "new_event_id",
    "new_event_ids",
    "parse_event_id",
    "utc_now",
]
