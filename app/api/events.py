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
from app.eventlog.tail import archived_within

__all__ = ["EventPage", "EventsController", "TruncatedRange"]

MAX_PAGE = 1000


class TruncatedRange(msgspec.Struct):
    """Events in ``first``..``last`` that retention removed from the log (``count`` of them,
    not every position in the range), kept in the archive segment named ``segment``."""

    first: int
    last: int
    count: int
    segment: str


class EventPage(msgspec.Struct, omit_defaults=True):
    events: list[Event]
    #: Pass as ``after`` for the next page (the last position looked at, not only returned).
    next_after: int
    head: int
    #: Ranges this page reaches into whose events were removed by retention (present only
    #: when there are some): the page holds the retained events only.
    truncated: list[TruncatedRange] = msgspec.field(default_factory=list)


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
        event_filter = build_filter(stream=stream, source_id=source_id, event=event)
        page = await services.store.read_after(after, event_filter, limit)
        # Looked up after the page: a page missing rows finds the segment that holds them.
        gone = await archived_within(services.store, after, page.scanned_to, event_filter)
        return EventPage(
            events=page.events,
            next_after=page.scanned_to,
            head=page.head,
            truncated=[TruncatedRange(**segment.describe()) for segment in gone],
        )

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
