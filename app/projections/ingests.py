"""The ingest projection behind ``GET /ingests``: one row per ingest, folded from its events.

``as_of`` reads do not need history tables: they fold one ingest's own events up to a
position with the same :func:`fold_ingest` the projection uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
from sqlalchemy import Column, Index, Integer, String, Table, Text, select
from sqlalchemy.ext.asyncio import AsyncConnection

from app.backends import upsert
from app.backends.schema import POSITION
from app.database import metadata
from app.eventlog import Event, EventFilter

__all__ = [
    "ACTIVE_STATUSES",
    "INGEST_STREAM",
    "TERMINAL_STATUSES",
    "IngestProjection",
    "IngestRow",
    "fold_ingest",
    "ingests",
    "list_ingests",
    "load_ingest",
]

INGEST_STREAM = "ingest"
TERMINAL_STATUSES = ("success", "skipped", "queued", "error")
ACTIVE_STATUSES = ("pending", "running", "interrupted")

ingests = Table(
    "ingests",
    metadata,
    Column("ingest_id", String(64), primary_key=True),
    Column("url", Text, nullable=False),
    Column("url_key", String(200), nullable=False),
    Column("type", String(16), nullable=False),
    Column("channel_limit", String(8), nullable=True),
    Column("status", String(16), nullable=False),
    Column("step", String(64), nullable=True),
    Column("message", Text, nullable=False),
    Column("requested_at", String(24), nullable=False),
    Column("started_at", String(24), nullable=True),
    Column("updated_at", String(24), nullable=False),
    Column("completed_at", String(24), nullable=True),
    Column("result", Text, nullable=True),
    Column("parent_id", String(64), nullable=True),
    Column("attempts", Integer, nullable=False),
    Column("children_total", Integer, nullable=False),
    Column("children_done", Integer, nullable=False),
    # Position of the ``requested`` event: the listing's order and paging cursor.
    Column("requested_position", POSITION, nullable=False),
    Column("position", POSITION, nullable=False),
    Column("version", Integer, nullable=False),
    Index("ix_ingests_status_requested_position", "status", "requested_position"),
    Index("ix_ingests_requested_position", "requested_position"),
    Index("ix_ingests_parent_id", "parent_id"),
    Index("ix_ingests_url_key", "url_key"),
)


class IngestRow(msgspec.Struct, frozen=True):
    """An ingest as ``GET /ingests/{id}`` shows it."""

    ingest_id: str
    url: str
    type: str
    status: str
    step: str | None
    message: str
    started_at: str | None
    updated_at: str
    completed_at: str | None
    result: Any
    parent_id: str | None
    position: int
    requested_at: str
    channel_limit: str | None = None
    attempts: int = 0
    children_total: int = 0
    children_done: int = 0
    version: int = 0


_COLUMNS = [column.name for column in ingests.columns]


def fold_ingest(state: dict[str, Any] | None, event: Event) -> dict[str, Any] | None:
    """Apply one ingest event to its row (None before the ``requested`` event)."""
    payload = event.payload_dict()
    kind = event.event
    if state is None:
        if kind != "requested":
            return None
        state = {
            "ingest_id": event.source_id,
            "url": payload.get("url", ""),
            "url_key": payload.get("url_key", ""),
            "type": payload.get("type", "article"),
            "channel_limit": payload.get("channel_limit"),
            "status": "pending",
            "step": None,
            "message": "Waiting to start",
            "requested_at": event.timestamp,
            "started_at": None,
            "completed_at": None,
            "result": None,
            "parent_id": payload.get("parent_id"),
            "attempts": 0,
            "children_total": 0,
            "children_done": 0,
            "requested_position": event.position,
        }
    else:
        state = dict(state)
        if state["status"] in TERMINAL_STATUSES:
            # Nothing changes a finished ingest (a late event from a cancelled run, say).
            state["position"] = event.position
            state["version"] = event.version
            return state
        if kind == "started":
            state["status"] = "running"
            state["attempts"] += 1
            state["started_at"] = state["started_at"] or event.timestamp
            state["message"] = payload.get("message", "Started")
        elif kind == "progress":
            state["status"] = "running"
            state["step"] = payload.get("step", state["step"])
            state["message"] = payload.get("message", state["message"])
        elif kind == "interrupted":
            state["status"] = "interrupted"
            state["message"] = payload.get("message", "Interrupted")
        elif kind == "complete":
            state["status"] = payload.get("status", "error")
            state["message"] = payload.get("message", "")
            state["completed_at"] = event.timestamp
            state["result"] = msgspec.json.encode(payload).decode()
    state["updated_at"] = event.timestamp
    state["position"] = event.position
    state["version"] = event.version
    return state


class IngestProjection:
    name = "ingests"
    tables: Sequence[Table] = (ingests,)
    source_filter = EventFilter(streams=(INGEST_STREAM,))

    async def apply(self, connection: AsyncConnection, events: Sequence[Event]) -> None:
        states = await _load(connection, {event.source_id for event in events})
        parents: set[str] = set()
        for event in events:
            before = states.get(event.source_id)
            after = fold_ingest(before, event)
            if after is None:
                continue
            states[event.source_id] = after
            parent = after.get("parent_id")
            if parent and (before is None or _finished(after) != _finished(before)):
                parents.add(parent)
        # Children change their parent's counters; parents may be outside this batch.
        missing = parents - states.keys()
        states.update(await _load(connection, missing))
        for parent_id in parents:
            if parent_id in states:
                await _count_children(connection, states, parent_id)
        await upsert(
            connection,
            ingests,
            [{name: row[name] for name in _COLUMNS} for row in states.values()],
            key=("ingest_id",),
        )


def _finished(row: dict[str, Any]) -> bool:
    return row["status"] in TERMINAL_STATUSES


async def _load(connection: AsyncConnection, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    pending = sorted(ids)
    for start in range(0, len(pending), 500):
        chunk = pending[start : start + 500]
        result = await connection.execute(select(ingests).where(ingests.c.ingest_id.in_(chunk)))
        found.update({row.ingest_id: dict(row._mapping) for row in result})
    return found


async def _count_children(
    connection: AsyncConnection, states: dict[str, dict[str, Any]], parent_id: str
) -> None:
    # Stored rows first, then this batch's newer versions of the same children on top.
    result = await connection.execute(
        select(ingests.c.ingest_id, ingests.c.status).where(ingests.c.parent_id == parent_id)
    )
    statuses = {row.ingest_id: row.status for row in result}
    statuses.update(
        {key: row["status"] for key, row in states.items() if row.get("parent_id") == parent_id}
    )
    parent = dict(states[parent_id])
    parent["children_total"] = len(statuses)
    parent["children_done"] = sum(status in TERMINAL_STATUSES for status in statuses.values())
    states[parent_id] = parent


def to_row(values: dict[str, Any]) -> IngestRow:
    fields = {name: values[name] for name in IngestRow.__struct_fields__ if name in values}
    if fields.get("result") is not None:
        fields["result"] = msgspec.json.decode(fields["result"])
    return IngestRow(**fields)


async def load_ingest(connection: AsyncConnection, ingest_id: str) -> IngestRow | None:
    row = (
        await connection.execute(select(ingests).where(ingests.c.ingest_id == ingest_id))
    ).first()
    return None if row is None else to_row(dict(row._mapping))


async def list_ingests(
    connection: AsyncConnection,
    *,
    statuses: Sequence[str] = (),
    types: Sequence[str] = (),
    parent_id: str | None = None,
    limit: int = 50,
    before: int | None = None,
) -> list[IngestRow]:
    """Ingests, newest request first; ``before`` is a ``requested_position`` cursor."""
    query = select(ingests)
    if statuses:
        query = query.where(ingests.c.status.in_(statuses))
    if types:
        query = query.where(ingests.c.type.in_(types))
    if parent_id is not None:
        query = query.where(ingests.c.parent_id == parent_id)
    if before is not None:
        query = query.where(ingests.c.requested_position < before)
    query = query.order_by(ingests.c.requested_position.desc()).limit(limit)
    return [to_row(dict(row._mapping)) for row in (await connection.execute(query)).all()]
