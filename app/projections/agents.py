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

from app.backends import upsert
from app.backends.schema import POSITION
from app.database import metadata
from app.eventlog import Event, EventFilter
from app.events.envelope import format_timestamp

__all__ = [
    "AGENT_STATUSES",
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
#: The statuses an activity shows: ``pending`` (a run waiting for its turn), ``running``,
#: ``stalled`` (quiet for three heartbeat periods), ``completed`` and ``failed``.
AGENT_STATUSES = ("pending", "running", "stalled", "completed", "failed")
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
    Column("stalled_at", String(24), nullable=True),
    Column("position", POSITION, nullable=False),
    Column("version", Integer, nullable=False),
    Index("ix_agent_activities_agent_name", "agent_name"),
    Index("ix_agent_activities_status_last_seen", "status", "last_seen"),
    Index("ix_agent_activities_position", "position"),
)


class ActivityRow(msgspec.Struct, frozen=True):
    """An agent activity as ``GET /agents`` shows it.

    ``last_seen`` is when the agent was last heard from (its last own event); ``stalled_at``
    is when the watchdog marked it stalled, None unless that mark is its latest event.
    """

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
    stalled_at: str | None = None


_COLUMNS = [column.name for column in agent_activities.columns]


class _Report(msgspec.Struct):
    """What the fold reads of an agent event's payload; the rest is not decoded, and
    ``result`` and ``error`` are kept as the JSON text they are in the payload."""

    agent_name: Any = msgspec.UNSET
    message: Any = msgspec.UNSET
    progress: Any = msgspec.UNSET
    status: Any = msgspec.UNSET
    result: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    error: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


_reports = msgspec.json.Decoder(list[_Report])
_NULL = b"null"


def _new_row(source_id: str) -> dict[str, Any]:
    return {
        "source_id": source_id,
        "agent_name": "",
        "status": "running",
        "message": "",
        "progress": None,
        "started_at": None,
        "completed_at": None,
        "result": None,
        "stalled_at": None,
    }


def _fold(row: dict[str, Any], event: Event, report: _Report) -> None:
    """Fold ``event`` (its payload read as ``report``) into its activity's ``row``."""
    agent_name = report.agent_name
    if type(agent_name) is str:
        row["agent_name"] = agent_name
    message = report.message
    if type(message) is str:
        row["message"] = message
    progress = report.progress
    if type(progress) is float or type(progress) is int:
        row["progress"] = float(progress)
    status = report.status if type(report.status) is str else None
    kind = event.event
    if kind == "progress" or (kind == "heartbeat" and row["status"] == "stalled"):
        row["status"] = status or "running"
    elif kind == "started":
        row["status"] = status or "running"
        row["started_at"] = event.timestamp
        row["completed_at"] = None
        row["result"] = None
    elif kind == "heartbeat" and status:
        row["status"] = status
    elif kind == "complete":
        row["status"] = "completed"
        row["completed_at"] = event.timestamp
        if progress is msgspec.UNSET:
            row["progress"] = 1.0
        row["result"] = _json_text(report.result)
    elif kind == "failed":
        row["status"] = "failed"
        row["completed_at"] = event.timestamp
        if report.result is not msgspec.UNSET:
            row["result"] = _json_text(report.result)
        else:
            error = report.error
            if error is msgspec.UNSET:
                error = msgspec.Raw(_NULL if message is msgspec.UNSET else _encode(message))
            row["result"] = f'{{"error":{bytes(error).decode()}}}'
    elif kind == "stalled":
        row["status"] = "stalled"
    if row["started_at"] is None:
        row["started_at"] = event.timestamp
    row["updated_at"] = event.timestamp
    if kind == "stalled":
        # The watchdog's mark, not word from the agent: last_seen stays when it last spoke.
        row["stalled_at"] = event.timestamp
        row.setdefault("last_seen", event.timestamp)
    else:
        row["last_seen"] = event.timestamp
        row["stalled_at"] = None
    row["position"] = event.position
    row["version"] = event.version


def _json_text(value: msgspec.Raw | msgspec.UnsetType) -> str | None:
    """A payload value's JSON text, None for a missing or null one."""
    if value is msgspec.UNSET:
        return None
    text = bytes(value)
    return None if text == _NULL else text.decode()


_encode = msgspec.json.encode


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
        # Every payload in one decode (the fold reads a few fields of each).
        reports = _reports.decode(b"[%s]" % b",".join([event.payload for event in events]))
        for event, report in zip(events, reports, strict=True):
            row = states.get(event.source_id)
            if row is None:
                row = states[event.source_id] = _new_row(event.source_id)
            _fold(row, event, report)
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
