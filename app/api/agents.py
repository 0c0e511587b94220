"""``/agents``: agents report their activity; dashboards read and follow it."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, get, post
from litestar.exceptions import ClientException, NotFoundException
from litestar.params import FromPath, JSONBody, QueryParameter

from app.agents.coordinator import InvalidRun
from app.agents.reports import (
    MAX_BATCH_EVENTS,
    AgentEventIn,
    AgentEventsIn,
    InvalidReport,
    check_source_id,
    to_new_event,
)
from app.api.deps import ServicesDep, build_filter
from app.api.events import LastEventIdHeader, LastEventIdQuery
from app.api.limits import MAX_POSITION, check_payload_sizes
from app.api.sse import EventStreamResponse, envelope_frame, log_stream, parse_last_event_id
from app.eventlog import AppendResult, NewEvent
from app.projections.agents import (
    AGENT_STATUSES,
    AGENT_STREAM,
    ActivityRow,
    list_activities,
    load_activity,
)

__all__ = [
    "AgentsController",
    "Appended",
    "BatchAppended",
    "appended",
    "batch_appended",
    "prepare_batch",
    "prepare_event",
]


class Appended(msgspec.Struct):
    position: int
    version: int
    event_id: str
    timestamp: str
    #: True when this event_id was already in the log (a retry): nothing new was written.
    duplicate: bool = False


class RunRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /agents/runs``: ``agent`` names one agent, ``agents`` several."""

    scope: str | list[str]
    agent: str | None = None
    agents: list[str] | None = None


class RunAccepted(msgspec.Struct):
    source_id: str
    status: str
    stream_url: str


class BatchAppended(msgspec.Struct):
    positions: list[int]
    versions: list[int]
    event_ids: list[str]


def prepare_event(source_id: str, data: AgentEventIn, max_payload_bytes: int) -> NewEvent:
    """``POST /agents/{source_id}/events``'s checks; raises the refusal the client gets."""
    event = to_new_event(source_id, data)
    check_payload_sizes([event], max_payload_bytes, batch=False)
    return event


def prepare_batch(data: AgentEventsIn, max_payload_bytes: int) -> list[NewEvent]:
    """``POST /agents/events``'s checks; raises the refusal the client gets."""
    if not data.events:
        raise ClientException(
            detail="events must hold at least one event", extra={"field": "events"}
        )
    if len(data.events) > MAX_BATCH_EVENTS:
        raise ClientException(
            detail=f"a batch holds at most {MAX_BATCH_EVENTS} events, got {len(data.events)}",
            extra={"field": "events"},
        )
    batch = [
        to_new_event(item.source_id, item, prefix=f"events[{index}].")
        for index, item in enumerate(data.events)
    ]
    check_payload_sizes(batch, max_payload_bytes, batch=True)
    ids = [event.event_id for event in batch if event.event_id]
    if len(ids) != len(set(ids)):
        raise ClientException(
            detail="event_id values must be unique within a batch", extra={"field": "events"}
        )
    return batch


def appended(result: AppendResult) -> Appended:
    return Appended(
        position=result.position,
        version=result.version,
        event_id=result.event_id,
        timestamp=result.timestamp,
        duplicate=result.duplicate,
    )


def batch_appended(results: list[AppendResult]) -> BatchAppended:
    return BatchAppended(
        positions=[r.position for r in results],
        versions=[r.version for r in results],
        event_ids=[r.event_id for r in results],
    )


async def _fresh(services: ServicesDep) -> None:
    """Read-your-writes: wait until the agents projection reflects the log's current head."""
    head = await services.store.head()
    await services.projections.wait_for("agents", head, within=2.0)


class AgentsController(Controller):
    path = "/agents"
    tags = ["agents"]

    @post("/{source_id:str}/events", summary="Append one agent event", status_code=201)
    async def append_event(
        self, services: ServicesDep, source_id: FromPath[str], data: JSONBody[AgentEventIn]
    ) -> Appended:
        event = prepare_event(source_id, data, services.settings.limits.max_payload_bytes)
        return appended(await services.store.append_one(event))

    @post("/events", summary="Append agent events atomically", status_code=201)
    async def append_events(
        self, services: ServicesDep, data: JSONBody[AgentEventsIn]
    ) -> BatchAppended:
        batch = prepare_batch(data, services.settings.limits.max_payload_bytes)
        return batch_appended(await services.store.append(batch))

    @post("/runs", summary="Run an agent over stored content (a coordinator job)", status_code=202)
    async def start_run(self, services: ServicesDep, data: JSONBody[RunRequest]) -> RunAccepted:
        agents = data.agents or ([data.agent] if data.agent else [])
        try:
            run_id = await services.runs.start_run(agents, data.scope, {"requested": "api"})
        except InvalidRun as exc:
            raise InvalidReport(exc.field, str(exc)) from None
        services.jobs.wake()
        return RunAccepted(
            source_id=run_id,
            status="pending",
            stream_url=f"/agents/stream?source_id={run_id}",
        )

    @get("/", summary="Agent activities, most recent first")
    async def list_agents(
        self,
        services: ServicesDep,
        status: Annotated[
            list[str] | None,
            QueryParameter(
                description=f"any of {', '.join(AGENT_STATUSES)} (repeatable)", required=False
            ),
        ] = None,
        agent_name: Annotated[list[str] | None, QueryParameter(required=False)] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
        before: Annotated[int | None, QueryParameter(ge=1, le=MAX_POSITION, required=False)] = None,
    ) -> list[ActivityRow]:
        checked = build_filter(agent_name=agent_name)
        for value in status or ():
            if value not in AGENT_STATUSES:
                raise ClientException(
                    detail=f"status must be one of {', '.join(AGENT_STATUSES)}, got {value[:40]!r}",
                    extra={"field": "status"},
                )
        await _fresh(services)
        async with services.engine.connect() as connection:
            return await list_activities(
                connection,
                heartbeat_seconds=services.settings.server.heartbeat_seconds,
                statuses=tuple(status or ()),
                agent_names=checked.agent_names,
                limit=limit,
                before=before,
            )

    @get("/stream", summary="Follow agent events over SSE (resumable)")
    async def stream_agents(
        self,
        services: ServicesDep,
        last_event_id_header: LastEventIdHeader = None,
        last_event_id: LastEventIdQuery = None,
        agent_name: Annotated[list[str] | None, QueryParameter(required=False)] = None,
        source_id: Annotated[list[str] | None, QueryParameter(required=False)] = None,
    ) -> EventStreamResponse:
        after = parse_last_event_id(last_event_id_header, last_event_id)
        event_filter = build_filter(
            stream=[AGENT_STREAM], source_id=source_id, agent_name=agent_name
        )
        return log_stream(services, after, event_filter, build=envelope_frame)

    @get("/{source_id:str}", summary="One agent activity")
    async def get_agent(self, services: ServicesDep, source_id: FromPath[str]) -> ActivityRow:
        check_source_id(source_id)
        await _fresh(services)
        async with services.engine.connect() as connection:
            row = await load_activity(
                connection, source_id, heartbeat_seconds=services.settings.server.heartbeat_seconds
            )
        if row is None:
            raise NotFoundException(detail=f"no agent activity {source_id!r}")
        return row
