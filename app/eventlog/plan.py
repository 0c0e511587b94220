"""Turning a group of append requests into rows: validation, versions and positions.

Pure functions, shared by every dialect's appender. They run while the appender holds the
log's write lock, with the current head, source versions and already-used event ids read in
that same transaction, so what they decide is what commits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import msgspec

from app.eventlog.envelope import Event, NewEvent, new_event_id
from app.eventlog.errors import AppendError, EventIdReused, VersionConflict

__all__ = ["AppendResult", "Plan", "Row", "plan_batch", "source_keys", "supplied_ids"]

SourceKey = tuple[str, str]


class AppendResult(NamedTuple):
    position: int
    version: int
    event_id: str
    timestamp: str
    # True when the event_id was already in the log: nothing was written for it.
    duplicate: bool = False


class Row(NamedTuple):
    """One events-table row, in column order."""

    position: int
    stream: str
    source_id: str
    version: int
    event: str
    event_id: str
    timestamp: str
    payload: str

    def to_event(self) -> Event:
        return Event(
            position=self.position,
            stream=self.stream,
            source_id=self.source_id,
            version=self.version,
            event=self.event,
            event_id=self.event_id,
            timestamp=self.timestamp,
            payload=msgspec.Raw(self.payload),
        )


class Plan(NamedTuple):
    rows: list[Row]
    # Per request, in order: its results, or the error that refused it (and only it).
    outcomes: list[list[AppendResult] | AppendError]


def source_keys(batch: Iterable[Sequence[NewEvent]]) -> set[SourceKey]:
    return {(event.stream, event.source_id) for request in batch for event in request}


def supplied_ids(batch: Iterable[Sequence[NewEvent]]) -> set[str]:
    return {event.event_id for request in batch for event in request if event.event_id}


def plan_batch(
    batch: Sequence[Sequence[NewEvent]],
    *,
    head: int,
    versions: Mapping[SourceKey, int],
    existing: Mapping[str, Event],
    timestamp: str,
) -> Plan:
    """Assign positions and versions to each request; a request is all or nothing."""
    rows: list[Row] = []
    outcomes: list[list[AppendResult] | AppendError] = []
    current = dict(versions)
    written: dict[str, Row] = {}
    for request in batch:
        try:
            request_rows, results, request_versions = _plan_request(
                request, head + len(rows), current, existing, written, timestamp
            )
        except AppendError as exc:
            outcomes.append(exc)
            continue
        current.update(request_versions)
        rows.extend(request_rows)
        written.update((row.event_id, row) for row in request_rows)
        outcomes.append(results)
    return Plan(rows, outcomes)


def _plan_request(
    request: Sequence[NewEvent],
    head: int,
    current: Mapping[SourceKey, int],
    existing: Mapping[str, Event],
    written: Mapping[str, Row],
    timestamp: str,
) -> tuple[list[Row], list[AppendResult], dict[SourceKey, int]]:
    rows: list[Row] = []
    results: list[AppendResult] = []
    versions: dict[SourceKey, int] = {}
    for new in request:
        if new.event_id is not None:
            earlier = _find_earlier(new, existing, written)
            if earlier is not None:
                results.append(earlier)
                continue
        key = (new.stream, new.source_id)
        version = versions.get(key, current.get(key, 0))
        if new.expected_version is not None and new.expected_version != version:
            raise VersionConflict(new.stream, new.source_id, new.expected_version, version)
        version += 1
        versions[key] = version
        row = Row(
            position=head + len(rows) + 1,
            stream=new.stream,
            source_id=new.source_id,
            version=version,
            event=new.event,
            event_id=new.event_id or new_event_id(),
            timestamp=timestamp,
            payload=bytes(new.payload).decode(),
        )
        rows.append(row)
        results.append(AppendResult(row.position, version, row.event_id, timestamp))
    return rows, results, versions


def _find_earlier(
    new: NewEvent, existing: Mapping[str, Event], written: Mapping[str, Row]
) -> AppendResult | None:
    """The original of a retried event, or None; a reused id for other content is refused."""
    assert new.event_id is not None
    stored = existing.get(new.event_id)
    if stored is not None:
        same = (stored.stream, stored.source_id, stored.event, bytes(stored.payload)) == (
            new.stream,
            new.source_id,
            new.event,
            bytes(new.payload),
        )
        if not same:
            raise EventIdReused(new.event_id, stored.position)
        return AppendResult(
            stored.position, stored.version, stored.event_id, stored.timestamp, duplicate=True
        )
    row = written.get(new.event_id)
    if row is not None:
        if (row.stream, row.source_id, row.event, row.payload) != (
            new.stream,
            new.source_id,
            new.event,
            bytes(new.payload).decode(),
        ):
            raise EventIdReused(new.event_id, row.position)
        return AppendResult(row.position, row.version, row.event_id, row.timestamp, duplicate=True)
    return None
