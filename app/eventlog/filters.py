"""Which events a reader wants: the same filter serves table reads and live tails."""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy import ColumnElement

from app.eventlog.tables import events
from app.events.envelope import Event

__all__ = ["EventFilter"]


class EventFilter(msgspec.Struct, frozen=True):
    """All given criteria must hold; within one criterion, any of the values may match."""

    streams: tuple[str, ...] = ()
    source_ids: tuple[str, ...] = ()
    events: tuple[str, ...] = ()
    # Matched against ``payload.agent_name``; applied after the table read.
    agent_names: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.streams or self.source_ids or self.events or self.agent_names)

    @property
    def rechecked(self) -> bool:
        """Whether rows read with :meth:`clauses` must still go through :meth:`matches`."""
        return bool(self.agent_names or (self.source_ids and (self.streams or self.events)))

    def clauses(self) -> list[ColumnElement[bool]]:
        """SQL conditions for the criteria the table has columns (and indexes) for.

        Given sources, only they are asked for: a source's events are few, and found through
        the (source_id, position) index. Combined with a stream condition, the planner
        (SQLite's has no statistics) may walk the stream's index instead, reading every
        event of the stream; the other criteria are then checked on the rows read
        (:attr:`rechecked`).
        """
        found: list[ColumnElement[bool]] = []
        criteria = (
            [(events.c.source_id, self.source_ids)]
            if self.source_ids
            else [(events.c.stream, self.streams), (events.c.event, self.events)]
        )
        for column, values in criteria:
            if len(values) == 1:
                found.append(column == values[0])
            elif values:
                found.append(column.in_(values))
        return found

    def matches(self, event: Event, payload: dict[str, Any] | None = None) -> bool:
        if self.streams and event.stream not in self.streams:
            return False
        if self.source_ids and event.source_id not in self.source_ids:
            return False
        if self.events and event.event not in self.events:
            return False
        if self.agent_names:
            if payload is None:
                payload = event.payload_dict()
            return payload.get("agent_name") in self.agent_names
        return True
