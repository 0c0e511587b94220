"""The snapshot behind ``GET /stats``, read in one pass over the projections' tables."""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy import func, literal, select
from sqlalchemy.ext.asyncio import AsyncConnection

from app.eventlog.tables import events
from app.projections.agents import (
    AGENT_STATUSES,
    NEVER_STALLED,
    agent_activities,
    stalled_before,
)
from app.projections.agents import TERMINAL_STATUSES as AGENT_FINISHED
from app.projections.base import checkpoints
from app.projections.ingests import ACTIVE_STATUSES, ingests
from app.projections.stats._projection import (
    EVENTS_TOTAL,
    STREAM_PREFIX,
    stats_counters,
    stats_recent,
)

__all__ = [
    "SNAPSHOT_PROJECTIONS",
    "ActiveIngest",
    "AgentCounts",
    "EventCounts",
    "IngestCounts",
    "RecentItem",
    "Stats",
    "read_stats",
]

#: The projections a snapshot is read from: it reflects the log up to the lowest checkpoint.
SNAPSHOT_PROJECTIONS = ("ingests", "agents", "stats")
INGEST_STATUSES = ("pending", "running", "interrupted", "success", "skipped", "queued", "error")
INGEST_TYPES = ("video", "channel", "article")


class ActiveIngest(msgspec.Struct, frozen=True):
    ingest_id: str
    url: str
    type: str
    status: str
    step: str | None
    message: str
    requested_at: str
    started_at: str | None
    updated_at: str
    parent_id: str | None
    attempts: int
    position: int


class RecentItem(msgspec.Struct, frozen=True):
    """A finished ingest (``kind: "ingest"``, ``label`` its type) or agent activity
    (``kind: "agent"``, ``label`` the agent's name)."""

    kind: str
    source_id: str
    status: str
    label: str
    message: str
    completed_at: str
    position: int
    started_at: str | None = None
    url: str | None = None
    title: str | None = None


class IngestCounts(msgspec.Struct, frozen=True):
    total: int
    by_status: dict[str, int]
    by_type: dict[str, int]


class AgentCounts(msgspec.Struct, frozen=True):
    running: int
    stalled: int
    total: int
    pending: int
    finished: int
    by_status: dict[str, int]


class EventCounts(msgspec.Struct, frozen=True):
    #: The log's head as of this snapshot (its ``position``).
    head: int
    total: int
    by_stream: dict[str, int]


class Stats(msgspec.Struct, frozen=True):
    #: Running ingests (pending, running, interrupted) plus running agent activities.
    processing_count: int
    active_ingests: list[ActiveIngest]
    ingests: IngestCounts
    agents: AgentCounts
    events: EventCounts
    #: Finished ingests and agent activities, newest first.
    recent: list[RecentItem]
    #: Every event up to this position is reflected (the SSE id of the snapshot).
    position: int


async def read_stats(
    connection: AsyncConnection,
    *,
    heartbeat_seconds: float,
    active_limit: int = 50,
    recent_limit: int = 20,
) -> Stats:
    # Checkpoints and counters first, in one statement: the rows read afterwards reflect at
    # least these positions, since projections only move forward.
    marks = (
        await connection.execute(
            select(stats_counters.c.name, stats_counters.c.value).union_all(
                select(literal("@") + checkpoints.c.name, checkpoints.c.position).where(
                    checkpoints.c.name.in_(SNAPSHOT_PROJECTIONS)
                )
            )
        )
    ).all()
    counters = {row[0]: int(row[1]) for row in marks}
    position = min(counters.get("@" + name, 0) for name in SNAPSHOT_PROJECTIONS)
    event_counts = await _count_events(connection, counters, position)
    ingest_counts = await _count_ingests(connection)
    agent_counts = await _count_agents(connection, heartbeat_seconds)
    active = await _active_ingests(connection, active_limit)
    active_total = sum(ingest_counts.by_status.get(status, 0) for status in ACTIVE_STATUSES)
    return Stats(
        processing_count=active_total + agent_counts.running,
        active_ingests=active,
        ingests=ingest_counts,
        agents=agent_counts,
        events=event_counts,
        recent=await _recent(connection, recent_limit),
        position=position,
    )


async def _count_events(
    connection: AsyncConnection, counters: dict[str, int], position: int
) -> EventCounts:
    """The event counts exactly at ``position``, which the stats projection may have passed:
    the events beyond it (a few, read by primary key) are taken off again."""
    total = counters.get(EVENTS_TOTAL, 0)
    by_stream = {
        name.removeprefix(STREAM_PREFIX): value
        for name, value in sorted(counters.items())
        if name.startswith(STREAM_PREFIX)
    }
    counted_to = counters.get("@stats", 0)
    if counted_to > position:
        beyond = await connection.execute(
            select(events.c.stream, func.count())
            .where(events.c.position > position, events.c.position <= counted_to)
            .group_by(events.c.stream)
        )
        for stream, count in beyond.all():
            total -= count
            by_stream[stream] = by_stream.get(stream, 0) - count
        by_stream = {name: count for name, count in by_stream.items() if count > 0}
    return EventCounts(head=position, total=total, by_stream=by_stream)


async def _count_ingests(connection: AsyncConnection) -> IngestCounts:
    by_status = dict.fromkeys(INGEST_STATUSES, 0)
    by_type = dict.fromkeys(INGEST_TYPES, 0)
    result = await connection.execute(
        select(ingests.c.status, ingests.c.type, func.count()).group_by(
            ingests.c.status, ingests.c.type
        )
    )
    for status, kind, count in result.all():
        by_status[status] = by_status.get(status, 0) + count
        by_type[kind] = by_type.get(kind, 0) + count
    return IngestCounts(total=sum(by_status.values()), by_status=by_status, by_type=by_type)


async def _count_agents(connection: AsyncConnection, heartbeat_seconds: float) -> AgentCounts:
    # The same rule as GET /agents: quiet for three heartbeat periods reads as stalled.
    quiet = agent_activities.c.last_seen < stalled_before(heartbeat_seconds)
    result = await connection.execute(
        select(agent_activities.c.status, quiet, func.count()).group_by(
            agent_activities.c.status, quiet
        )
    )
    by_status = dict.fromkeys(AGENT_STATUSES, 0)
    running = 0
    for status, is_quiet, count in result.all():
        if status not in NEVER_STALLED and (status == "stalled" or is_quiet):
            status = "stalled"
        elif status not in NEVER_STALLED:
            running += count
        by_status[status] = by_status.get(status, 0) + count
    finished = sum(by_status[status] for status in AGENT_FINISHED)
    return AgentCounts(
        running=running,
        stalled=by_status["stalled"],
        total=sum(by_status.values()),
        pending=by_status["pending"],
        finished=finished,
        by_status=by_status,
    )


async def _active_ingests(connection: AsyncConnection, limit: int) -> list[ActiveIngest]:
    query = (
        select(*(ingests.c[name] for name in ActiveIngest.__struct_fields__))
        .where(ingests.c.status.in_(ACTIVE_STATUSES))
        .order_by(ingests.c.requested_position.desc())
        .limit(limit)
    )
    return [ActiveIngest(**row._mapping) for row in (await connection.execute(query)).all()]


async def _recent(connection: AsyncConnection, limit: int) -> list[RecentItem]:
    rows = (
        await connection.execute(
            select(stats_recent).order_by(stats_recent.c.position.desc()).limit(limit)
        )
    ).all()
    ingest_ids = [row.source_id for row in rows if row.kind == "ingest"]
    agent_ids = [row.source_id for row in rows if row.kind == "agent"]
    details: dict[tuple[str, str], dict[str, Any]] = {}
    if ingest_ids:
        found = await connection.execute(
            select(
                ingests.c.ingest_id, ingests.c.url, ingests.c.started_at, ingests.c.result
            ).where(ingests.c.ingest_id.in_(ingest_ids))
        )
        for ingest_id, url, started_at, result in found.all():
            title = _title(result)
            details[("ingest", ingest_id)] = {"url": url, "started_at": started_at, "title": title}
    if agent_ids:
        runs = await connection.execute(
            select(agent_activities.c.source_id, agent_activities.c.started_at).where(
                agent_activities.c.source_id.in_(agent_ids)
            )
        )
        for source_id, started_at in runs.all():
            details[("agent", source_id)] = {"started_at": started_at}
    return [
        RecentItem(
            kind=row.kind,
            source_id=row.source_id,
            status=row.status,
            label=row.label,
            message=row.message,
            completed_at=row.completed_at,
            position=row.position,
            **details.get((row.kind, row.source_id), {}),
        )
        for row in rows
    ]


def _title(result: str | None) -> str | None:
    if not result:
        return None
    try:
        details = msgspec.json.decode(result).get("details") or {}
    except (msgspec.DecodeError, AttributeError):
        return None
    title = details.get("title") if isinstance(details, dict) else None
    return title if isinstance(title, str) else None
