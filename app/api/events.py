"""``/events``: the whole log, paged and streamed."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, get
from litestar.params import HeaderParameter, QueryParameter

from app.api.deps import ServicesDep, build_filter
from app.api.limits import MAX_POSITION
from app.api.sse import EventStreamResponse, envelope_frame, log_stream, parse_last_event_id
from app.eventlog import Event

__all__ = ["EventPage", "EventsController"]

MAX_PAGE = 1000


class EventPage(msgspec.Struct):
    events: list[Event]
    #: Pass as ``after`` for the next page (the last position looked at, not only returned).
    next_after: int
    head: int


StreamFilter = Annotated[
    list[str] | None, QueryParameter(description="only these streams (repeatable)", required=False)
]
SourceFilter = Annotated[
    list[str] | None, QueryParameter(description="only these sources (repeatable)", required=False)
]
EventNameFilter = Annotated[
    list[str] | None,
    QueryParameter(description="only these event names (repeatable)", required=False),
]
LastEventIdHeader = Annotated[
    str | None,
    HeaderParameter(name="Last-Event-ID", required=False, description="resume after this position"),
]
LastEventIdQuery = Annotated[
    str | None,
    QueryParameter(
        name="last_event_id",
        required=False,
        description="resume after this position (for clients that cannot set headers)",
    ),
]


class EventsController(Controller):
    path = "/events"
    tags = ["log"]

    @get("/", summary="Read the log after a position")
    async def list_events(
        self,
        services: ServicesDep,
        after: Annotated[
            int,
            QueryParameter(ge=0, le=MAX_POSITION, description="return events above this position"),
        ] = 0,
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 100,
        stream: StreamFilter = None,
        source_id: SourceFilter = None,
        event: EventNameFilter = None,
    ) -> EventPage:
        page = await services.store.read_after(
            after, build_filter(stream=stream, source_id=source_id, event=event), limit
        )
        return EventPage(events=page.events, next_after=page.scanned_to, head=page.head)

    @get("/stream", summary="Follow the log over SSE (resumable)")
    async def stream_events(
        self,
        services: ServicesDep,
        last_event_id_header: LastEventIdHeader = None,
        last_event_id: LastEventIdQuery = None,
        stream: StreamFilter = None,
        source_id: SourceFilter = None,
        event: EventNameFilter = None,
    ) -> EventStreamResponse:
        after = parse_last_event_id(last_event_id_header, last_event_id)
        event_filter = build_filter(stream=stream, source_id=source_id, event=event)
        return log_stream(services, after, event_filter, build=envelope_frame)
