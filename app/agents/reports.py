"""Validation of agent events reported over HTTP, and their translation into log appends."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from app.eventlog import NewEvent, canonical_decoded, parse_event_id
from app.eventlog.tables import MAX_VERSION
from app.projections.agents import AGENT_STREAM

__all__ = [
    "MAX_BATCH_EVENTS",
    "AgentEventIn",
    "AgentEventsIn",
    "BatchEventIn",
    "InvalidReport",
    "check_source_id",
    "to_new_event",
]

MAX_BATCH_EVENTS = 1000
SOURCE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,199}")

AgentEventName = Literal["started", "progress", "heartbeat", "complete", "failed"]
#: A version the log can hold: larger ones are refused while the request is decoded (400
#: naming the field), so no request carries a number the writer cannot represent.
ExpectedVersion = Annotated[int, msgspec.Meta(ge=0, le=MAX_VERSION)]


class InvalidReport(ValueError):
    """An agent event that breaks the contract; ``field`` names the offending part."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


class AgentEventIn(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /agents/{source_id}/events``."""

    event: AgentEventName
    payload: dict[str, Any]
    event_id: str | None = None
    expected_version: ExpectedVersion | None = None


class BatchEventIn(AgentEventIn, forbid_unknown_fields=True):
    source_id: str = ""


class AgentEventsIn(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /agents/events``: all or nothing."""

    events: list[BatchEventIn]


# Source ids already found valid: an agent reports under the same few ids again and again,
# so most checks are one set lookup. Bounded.
_valid_source_ids: set[str] = set()
_VALID_CAPACITY = 10_000


def check_source_id(source_id: str, field: str = "source_id", *, prefix: str = "") -> str:
    if source_id in _valid_source_ids:
        return source_id
    if not SOURCE_ID_PATTERN.fullmatch(source_id):
        field = prefix + field
        raise InvalidReport(
            field,
            f"{field} must be 1-200 characters of letters, digits and ._:@+=- starting with a "
            f"letter or digit, got {source_id[:60]!r}",
        )
    if len(_valid_source_ids) >= _VALID_CAPACITY:
        _valid_source_ids.clear()
    _valid_source_ids.add(source_id)
    return source_id


def to_new_event(source_id: str, report: AgentEventIn, prefix: str = "") -> NewEvent:
    """Check one reported event (decoded from a request's JSON, so its payload's keys are
    text) against the contract and make it appendable."""
    check_source_id(source_id, prefix=prefix)
    payload = report.payload
    agent_name = payload.get("agent_name")
    if not isinstance(agent_name, str) or not agent_name.strip() or len(agent_name) > 200:
        raise InvalidReport(
            f"{prefix}payload.agent_name",
            "payload.agent_name must be a non-empty string (at most 200 characters)",
        )
    for key in ("status", "message"):
        if key in payload and not isinstance(payload[key], str):
            raise InvalidReport(f"{prefix}payload.{key}", f"payload.{key} must be a string")
    if "progress" in payload:
        progress = payload["progress"]
        if (
            isinstance(progress, bool)
            or not isinstance(progress, (int, float))
            or not 0 <= progress <= 1
        ):
            raise InvalidReport(
                f"{prefix}payload.progress",
                f"payload.progress must be a number from 0 to 1, got {progress!r}",
            )
    event_id = None
    if report.event_id is not None:
        try:
            event_id = parse_event_id(report.event_id)
        except ValueError as exc:
            raise InvalidReport(f"{prefix}event_id", str(exc)) from None
    try:
        raw = canonical_decoded(payload)
    except ValueError as exc:
        raise InvalidReport(f"{prefix}payload", str(exc)) from None
    # Positional, in NewEvent's order: one is made per reported event.
    return NewEvent(AGENT_STREAM, source_id, report.event, raw, event_id, report.expected_version)
