"""Importing an exported log: besides the appender, the only code that writes the events table.

The appender assigns positions, versions, event ids and timestamps; an import must keep the
ones it is given (an audit copy, a migration to another database), so it writes envelopes as
they are, byte for byte. That is safe only into an empty log and only for a log that could
have been appended: positions strictly increasing, each source's versions counting from 1
without gaps, event ids unique, names and payloads as the appender would accept them.
Anything else refuses the whole import.

The import is one transaction, written in batches: a refused or interrupted import leaves the
log empty. It holds the log's write lock (SQLite's ``BEGIN IMMEDIATE``, PostgreSQL's append
advisory lock) from the emptiness check to the commit, so no append can slip in between.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

import msgspec
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.backends import backend_of
from app.eventlog.store import check_names
from app.eventlog.tables import events
from app.events.chain import GENESIS, event_chain
from app.events.envelope import Event, parse_event_id

__all__ = ["ImportRefused", "ImportResult", "import_events"]

_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
_payload_decoder = msgspec.json.Decoder(dict[str, object])


class ImportRefused(ValueError):
    """The log is not empty, or the events are not a log that could have been appended."""


class ImportResult(NamedTuple):
    imported: int
    head: int


class _Checks:
    """What the appender would have guaranteed, checked event by event in constant memory
    (per source, only its current version)."""

    def __init__(self) -> None:
        self.count = 0
        self.head = 0
        # The chain value of the last event checked: an imported log is chained as its
        # appender chained it, from the first event on.
        self.chain = GENESIS
        self._versions: dict[tuple[str, str], int] = {}

    def row(self, event: Event) -> dict[str, object]:
        where = f"event at position {event.position}"
        if event.position <= self.head:
            raise ImportRefused(
                f"{where} follows position {self.head}: positions must be strictly increasing"
            )
        try:
            check_names(event)
            canonical = parse_event_id(event.event_id)
        except ValueError as exc:
            raise ImportRefused(f"{where}: {exc}") from None
        if canonical != event.event_id:
            raise ImportRefused(f"{where}: event_id {event.event_id!r} is not a lowercase UUID")
        if not _TIMESTAMP.fullmatch(event.timestamp):
            raise ImportRefused(
                f"{where}: timestamp must be RFC 3339 UTC with milliseconds "
                f"(2025-01-24T12:34:56.789Z), got {event.timestamp!r}"
            )
        payload = bytes(event.payload)
        try:
            _payload_decoder.decode(payload)
        except msgspec.DecodeError as exc:
            raise ImportRefused(f"{where}: payload must be a JSON object ({exc})") from None
        if b"\n" in payload or b"\r" in payload:
            # It is sent as one SSE data line.
            raise ImportRefused(f"{where}: payload must not contain line breaks")
        key = (event.stream, event.source_id)
        expected = self._versions.get(key, 0) + 1
        if event.version != expected:
            raise ImportRefused(
                f"{where}: {event.stream}/{event.source_id} has version {event.version} where "
                f"{expected} was expected (versions count from 1 without gaps; an export of a log "
                "that retention has trimmed is whole only with --include-archives)"
            )
        self._versions[key] = expected
        self.count += 1
        self.head = event.position
        self.chain = event_chain(self.chain, event)
        return {
            "position": event.position,
            "stream": event.stream,
            "source_id": event.source_id,
            "version": event.version,
            "event": event.event,
            "event_id": event.event_id,
            "timestamp": event.timestamp,
            "payload": payload.decode("utf-8"),
            "chain": self.chain,
        }


async def import_events(
    engine: AsyncEngine, found: Iterable[Event], *, batch_size: int = 2000
) -> ImportResult:
    """Write ``found`` into the empty log as they are; all or nothing.

    Raises :class:`ImportRefused` (nothing written) if the log holds any event, or if the
    events break an invariant of the log.
    """
    checks = _Checks()
    backend = backend_of(engine)
    async with engine.connect() as connection:
        connection = await backend.write_transaction(connection)
        async with connection.begin():
            await backend.lock_log(connection)
            head = (
                await connection.execute(select(func.coalesce(func.max(events.c.position), 0)))
            ).scalar_one()
            if head:
                count = (
                    await connection.execute(select(func.count()).select_from(events))
                ).scalar_one()
                raise ImportRefused(
                    f"the log is not empty ({count} events, head {head}): an import keeps the "
                    "exported positions and event ids, so it goes into an empty log only"
                )
            batch: list[dict[str, object]] = []
            try:
                for event in found:
                    batch.append(checks.row(event))
                    if len(batch) >= batch_size:
                        await connection.execute(insert(events), batch)
                        batch = []
                if batch:
                    await connection.execute(insert(events), batch)
            except IntegrityError as exc:
                raise ImportRefused(f"an event_id appears twice: {exc.orig}") from None
            if checks.count:
                # Wakes other processes' tails, as an append would.
                await backend.announce(connection, checks.head)
    return ImportResult(checks.count, checks.head)
