"""The agent activity projection behind ``GET /agents``: one row per activity (source)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from sqlalchemy import (
    Column,
    ColumnElement,
    Float,
    Index,
    Integer,
    String,
    Table,
    Text,
    and_,
    not_,
    or_,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from app.database import metadata, upsert
from app.eventlog import Event, EventFilter
from app.eventlog.envelope import format_timestamp
from app.eventlog.tables import POSITION

__all__ = [
    "AGENT_STREAM",
    "NEVER_STALLED",
    "TERMINAL_STATUSES",
    "ActivityRow",
    "AgentProjection",
    "agent_activities",
    "list_activities",
    "load_activity",
]

AGENT_STREAM = "agent"
TERMINAL_STATUSES = ("completed", "failed")
#: Statuses an activity can keep quietly: finished, or queued and waiting for its turn.
NEVER_STALLED = (*TERMINAL_STATUSES, "pending")

agent_activities = Table(
    "agent_activities",
    metadata,
    Column("source_id", String(200), primary_key=True),
    Column("agent_name", String(200), nullable=False),
    Column("status", String(50), nullable=False),
    Column("message", Text, nullable=False),
    Column("progress", Float, nullable=True),
    Column("started_at", String(24), nullable=True),
    Column("updated_at", String(24), nullable=False),
    Column("completed_at", String(24), nullable=True),
    Column("result", Text, nullable=True),
    Column("last_seen", String(24), nullable=False),
    Column("position", POSITION, nullable=False),
    Column("version", Integer, nullable=False),
    Index("ix_agent_activities_agent_name", "agent_name"),
    Index("ix_agent_activities_status_last_seen", "status", "last_seen"),
    Index("ix_agent_activities_position", "position"),
)


class ActivityRow(msgspec.Struct, frozen=True):
    """An agent activity as ``GET /agents`` shows it."""

    source_id: str
    agent_name: str
    status: str
    message: str
    progress: float | None
    started_at: str | None
    updated_at: str
    completed_at: str | None
    result: Any
    last_seen: str
    position: int
    version: int


_COLUMNS = [column.name for column in agent_activities.columns]


def _fold(state: dict[str, Any] | None, event: Event) -> dict[str, Any]:
    payload = event.payload_dict()
    row: dict[str, Any] = (
        dict(state)
        if state is not None
        else {
            "source_id": event.source_id,
            "agent_name": "",
            "status": "running",
            "message": "",
            "progress": None,
            "started_at": None,
            "completed_at": None,
            "result": None,
        }
    )
    if isinstance(payload.get("agent_name"), str):
        row["agent_name"] = payload["agent_name"]
    if isinstance(payload.get("message"), str):
        row["message"] = payload["message"]
    progress = payload.get("progress")
    if isinstance(progress, (int, float)) and not isinstance(progress, bool):
        row["progress"] = float(progress)
    status = payload.get("status") if isinstance(payload.get("status"), str) else None
    kind = event.event
    if kind == "started":
        row["status"] = status or "running"
        row["started_at"] = event.timestamp
        row["completed_at"] = None
        row["result"] = None
    elif kind == "progress" or (kind == "heartbeat" and row["status"] == "stalled"):
        row["status"] = status or "running"
    elif kind == "heartbeat" and status:
        row["status"] = status
    elif kind == "complete":
        row["status"] = "completed"
        row["completed_at"] = event.timestamp
        if "progress" not in payload:
            row["progress"] = 1.0
        row["result"] = _json_text(payload.get("result"))
    elif kind == "failed":
        row["status"] = "failed"
        row["completed_at"] = event.timestamp
        error = payload.get("error", payload.get("message"))
        row["result"] = _json_text(payload.get("result", {"error": error}))
    elif kind == "stalled":
        row["status"] = "stalled"
    if row["started_at"] is None:
        row["started_at"] = event.timestamp
    row["updated_at"] = event.timestamp
    row["last_seen"] = event.timestamp
    row["position"] = event.position
    row["version"] = event.version
    return row


def _json_text(value: Any) -> str | None:
    return None if value is None else msgspec.json.encode(value).decode()


class AgentProjection:
    name = "agents"
    tables: Sequence[Table] = (agent_activities,)
    source_filter = EventFilter(streams=(AGENT_STREAM,))

    async def apply(self, connection: AsyncConnection, events: Sequence[Event]) -> None:
        touched = sorted({event.source_id for event in events})
        states: dict[str, dict[str, Any]] = {}
        for start in range(0, len(touched), 500):
            chunk = touched[start : start + 500]
            result = await connection.execute(
                select(agent_activities).where(agent_activities.c.source_id.in_(chunk))
            )
            states.update({row.source_id: dict(row._mapping) for row in result})
        for event in events:
            states[event.source_id] = _fold(states.get(event.source_id), event)
        await upsert(
            connection,
            agent_activities,
            [{name: states[key][name] for name in _COLUMNS} for key in touched],
            key=("source_id",),
        )


def stalled_before(heartbeat_seconds: float, now: datetime | None = None) -> str:
    """Activities whose last event is older than this timestamp are stalled."""
    now = now or datetime.now(UTC)
    return format_timestamp(now - timedelta(seconds=3 * heartbeat_seconds))


def _is_stalled(threshold: str) -> ColumnElement[bool]:
    return and_(
        not_(agent_activities.c.status.in_(NEVER_STALLED)),
        or_(agent_activities.c.status == "stalled", agent_activities.c.last_seen < threshold),
    )


def _to_activity(row: Any, threshold: str) -> ActivityRow:
    values = dict(row._mapping)
    if values["status"] not in NEVER_STALLED and values["last_seen"] < threshold:
        values["status"] = "stalled"
    if values["result"] is not None:
        values["result"] = msgspec.json.decode(values["result"])
    return ActivityRow(**values)


async def load_activity(
    connection: AsyncConnection, source_id: str, *, heartbeat_seconds: float
) -> ActivityRow | None:
    row = (
        await connection.execute(
            select(agent_activities).where(agent_activities.c.source_id == source_id)
        )
    ).first()
    return None if row is None else _to_activity(row, stalled_before(heartbeat_seconds))


async def list_activities(
    connection: AsyncConnection,
    *,
    heartbeat_seconds: float,
    statuses: Sequence[str] = (),
    agent_names: Sequence[str] = (),
    limit: int = 100,
    before: int | None = None,
) -> list[ActivityRow]:
    """Activities, most recently updated first (``before``: a position, for paging)."""
    threshold = stalled_before(heartbeat_seconds)
    query = select(agent_activities)
    if agent_names:
        query = query.where(agent_activities.c.agent_name.in_(agent_names))
    if before is not None:
        query = query.where(agent_activities.c.position < before)
    if statuses:
        conditions: list[ColumnElement[bool]] = []
        plain = [status for status in statuses if status != "stalled"]
        if "stalled" in statuses:
            conditions.append(_is_stalled(threshold))
        if plain:
            conditions.append(
                and_(agent_activities.c.status.in_(plain), not_(_is_stalled(threshold)))
            )
        query = query.where(or_(*conditions))
    query = query.order_by(agent_activities.c.position.desc()).limit(limit)
    rows = (await connection.execute(query)).all()
    return [_to_activity(row, threshold) for row in rows]
