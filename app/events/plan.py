"""Turning a group of append requests into rows: validation, versions and positions.

Pure functions, shared by every backend's appender. They run while the appender holds the
log's write lock, with the current head, source versions and already-used event ids read in
that same transaction, so what they decide is what commits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import msgspec

from app.events.chain import canonical_bytes, link
from app.events.envelope import Event, NewEvent, new_event_ids
from app.events.errors import AppendError, EventIdReused, VersionConflict

__all__ = [
    "COLUMNS",
    "AppendResult",
    "Plan",
    "Row",
    "SourceKey",
    "VersionCache",
    "event_from_row",
    "plan_batch",
    "source_keys",
    "supplied_ids",
]

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
    # The event's chain value (app/events/chain.py); None while the chain is off.
    chain: bytes | None

    def to_event(self) -> Event:
        return Event(
            self[0], self[1], self[2], self[3], self[4], self[5], self[6], msgspec.Raw(self[7])
        )


#: The events table's columns, in :class:`Row`'s order, for the appenders' own SQL.
COLUMNS = ", ".join(Row._fields)


def event_from_row(row: Sequence[Any]) -> Event:
    """An event read by an appender's own SQL, its columns in :data:`COLUMNS`' order."""
    position, stream, source_id, version, event, event_id, timestamp, payload = row[:8]
    return Event(
        position, stream, source_id, version, event, event_id, timestamp, msgspec.Raw(payload)
    )


class Plan(NamedTuple):
    rows: list[Row]
    # Per request, in order: its results, or the error that refused it (and only it).
    outcomes: list[list[AppendResult] | AppendError]
    # Every source's version once the plan commits (those it touched and those it was given).
    versions: dict[SourceKey, int] = {}
    # The rows written, as events, where an appender had them so (the writer process's
    # replies carry no rows: they are built from the requests); else made from ``rows``.
    written: list[Event] | None = None

    def events(self) -> list[Event]:
        """What the plan wrote, as events, in position order."""
        if self.written is not None:
            return self.written
        return [row.to_event() for row in self.rows]


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
    chain: bytes | None,
) -> Plan:
    """Assign positions and versions to each request; a request is all or nothing.

    ``chain`` is the head's chain value, which each row's chain value follows; None: the
    chain is off, and the rows carry none."""
    rows: list[Row] = []
    outcomes: list[list[AppendResult] | AppendError] = []
    current = dict(versions)
    written: dict[str, Row] = {}
    # One draw of ids for the whole batch, ascending in position order (see new_event_ids).
    ids = iter(new_event_ids(sum(len(request) for request in batch)))
    for request in batch:
        if all(new.event_id is None and new.expected_version is None for new in request):
            # Nothing in it can be refused: no trial copy of the versions is needed.
            outcomes.append(_assign(request, head, rows, current, ids, timestamp, chain))
            continue
        trial = _Trial(current)
        first = len(rows)
        try:
            results = _plan_checked(
                request, head, rows, trial, existing, written, ids, timestamp, chain
            )
        except AppendError as exc:
            del rows[first:]
            outcomes.append(exc)
            continue
        current.update(trial.changed)
        written.update((row.event_id, row) for row in rows[first:])
        outcomes.append(results)
    return Plan(rows, outcomes, current)


class _Trial:
    """Versions as a request would leave them, kept apart until the request is accepted."""

    __slots__ = ("base", "changed")

    def __init__(self, base: Mapping[SourceKey, int]) -> None:
        self.base = base
        self.changed: dict[SourceKey, int] = {}

    def get(self, key: SourceKey) -> int:
        found = self.changed.get(key)
        return found if found is not None else self.base.get(key, 0)


# tuple.__new__ builds a NamedTuple without its generated Python-level __new__: less than half
# the cost, paid for every row and every result of every append.
_make = tuple.__new__


def _assign(
    request: Sequence[NewEvent],
    head: int,
    rows: list[Row],
    current: dict[SourceKey, int],
    ids: Iterator[str],
    timestamp: str,
    chain: bytes | None,
) -> list[AppendResult]:
    results: list[AppendResult] = []
    position = head + len(rows)
    # Each row's chain value follows the row before it, which is this batch's last row so far
    # (a refused request's rows are gone from ``rows``), or the head's.
    previous = rows[-1][8] if rows else chain
    for new in request:
        key = (new.stream, new.source_id)
        version = current.get(key, 0) + 1
        current[key] = version
        position += 1
        event_id = next(ids)
        payload = str(new.payload, "utf-8")
        if previous is not None:
            previous = _linked(previous, position, new, version, event_id, timestamp, payload)
        rows.append(
            _make(
                Row,
                (
                    position,
                    new.stream,
                    new.source_id,
                    version,
                    new.event,
                    event_id,
                    timestamp,
                    payload,
                    previous,
                ),
            )
        )
        results.append(_make(AppendResult, (position, version, event_id, timestamp, False)))
    return results


def _plan_checked(
    request: Sequence[NewEvent],
    head: int,
    rows: list[Row],
    trial: _Trial,
    existing: Mapping[str, Event],
    written: Mapping[str, Row],
    ids: Iterator[str],
    timestamp: str,
    chain: bytes | None,
) -> list[AppendResult]:
    results: list[AppendResult] = []
    for new in request:
        if new.event_id is not None:
            earlier = _find_earlier(new, existing, written)
            if earlier is not None:
                results.append(earlier)
                continue
        key = (new.stream, new.source_id)
        version = trial.get(key)
        if new.expected_version is not None and new.expected_version != version:
            raise VersionConflict(new.stream, new.source_id, new.expected_version, version)
        version += 1
        trial.changed[key] = version
        position = head + len(rows) + 1
        event_id = new.event_id or next(ids)
        payload = str(new.payload, "utf-8")
        previous = rows[-1].chain if rows else chain
        if previous is not None:
            previous = _linked(previous, position, new, version, event_id, timestamp, payload)
        row = Row(
            position,
            new.stream,
            new.source_id,
            version,
            new.event,
            event_id,
            timestamp,
            payload,
            previous,
        )
        rows.append(row)
        results.append(AppendResult(row.position, version, row.event_id, timestamp))
    return results


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


class VersionCache:
    """Each source's current version and the head's chain value, as this appender last
    committed them.

    Valid only while nobody else appends: every batch reads the head under the write lock,
    and a head other than the one this appender last committed means another writer (another
    process) moved the log, so the cache is dropped and versions are read from the table.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._versions: dict[SourceKey, int] = {}
        self._head: int | None = None
        self._chain: bytes | None = None

    def begin(
        self, head: int, keys: set[SourceKey]
    ) -> tuple[dict[SourceKey, int], list[SourceKey]]:
        """The cached versions of ``keys``, and the keys that must be read from the table."""
        if head != self._head:
            self._versions.clear()
        known = {key: self._versions[key] for key in keys if key in self._versions}
        return known, [key for key in keys if key not in known]

    @property
    def head(self) -> int | None:
        """The head this appender committed last, or None if the cache knows nothing."""
        return self._head

    def knows(self, key: SourceKey) -> bool:
        """Whether ``key``'s version is cached (valid only if the head is still :attr:`head`)."""
        return key in self._versions

    def caught_up(self, head: int, versions: Mapping[SourceKey, int], chain: bytes | None) -> None:
        """After reading every event another writer appended since :attr:`head`: their
        sources' versions, and ``head`` with its chain value, are now the log's."""
        self._versions.update(versions)
        self._head, self._chain = head, chain

    def chain_at(self, head: int) -> bytes | None:
        """The chain value at ``head`` if this appender committed it, else None (read it)."""
        return self._chain if head == self._head else None

    def committed(self, plan: Plan, head: int, chain: bytes | None) -> None:
        """After ``plan`` committed over ``head``, whose chain value was ``chain``."""
        if len(self._versions) > self._capacity:
            self._versions.clear()
        self._versions.update(plan.versions)
        if plan.rows:
            self._head, self._chain = plan.rows[-1].position, plan.rows[-1].chain
        else:
            self._head, self._chain = head, chain

    def forget(self) -> None:
        self._head = None


def _linked(
    previous: bytes,
    position: int,
    new: NewEvent,
    version: int,
    event_id: str,
    timestamp: str,
    payload: str,
) -> bytes:
    """The chain value of ``new`` written at ``position`` after ``previous``."""
    return link(
        previous,
        canonical_bytes(
            position, new.stream, new.source_id, version, new.event, event_id, timestamp, payload
        ),
    )
