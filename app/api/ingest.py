"""Ingest endpoints: the seed-compatible ``/ingest`` ones and the ``/ingests`` resource."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Response, delete, get, post
from litestar.exceptions import ClientException, NotFoundException
from litestar.params import FromPath, JSONBody, QueryParameter

from app.api.deps import ServicesDep
from app.api.events import LastEventIdHeader, LastEventIdQuery, TruncatedRange
from app.api.limits import MAX_POSITION
from app.api.sse import log_stream, parse_last_event_id, payload_frame
from app.eventlog import Event, EventFilter
from app.eventlog.notify import LogEntry
from app.eventlog.tail import archived_within
from app.ingest.service import NotCancellable, UnknownIngest, fold_events
from app.ingest.urls import detect_url
from app.projections.ingests import INGEST_STREAM, IngestRow, list_ingests, load_ingest, to_row
from app.runtime.services import Services

__all__ = ["IngestController", "IngestsController"]

INGEST_STATUSES = ("pending", "running", "success", "skipped", "queued", "error", "interrupted")
INGEST_TYPES = ("video", "channel", "article")


class IngestRequest(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    channel_limit: Literal["month", "year", "50", "100", "all"] = "all"


class Detected(msgspec.Struct):
    url: str
    type: str
    video_id: str | None = None
    channel: str | None = None


class IngestAccepted(msgspec.Struct):
    ingest_id: str
    status: str
    stream_url: str
    #: False when the URL was already being ingested and this is that ingest.
    created: bool


class IngestEvents(msgspec.Struct, omit_defaults=True):
    events: list[Event]
    next_after: int
    #: As on ``GET /events``: ranges of this ingest's events retention removed (if any).
    truncated: list[TruncatedRange] = msgspec.field(default_factory=list)


def _filter(ingest_id: str) -> EventFilter:
    return EventFilter(streams=(INGEST_STREAM,), source_ids=(ingest_id,))


def _is_complete(entry: LogEntry) -> bool:
    return entry.event.event == "complete"


async def _stream(services: Services, ingest_id: str, after: int | None) -> Response[Any]:
    """SSE of one ingest, ending after ``complete``; 204 when resuming past ``complete``."""
    events = await services.store.read_source(INGEST_STREAM, ingest_id)
    if not events:
        raise NotFoundException(detail=f"no ingest {ingest_id!r}")
    finished = next((e.position for e in events if e.event == "complete"), None)
    if after is not None and finished is not None and after >= finished:
        return Response(content=b"", status_code=204)
    return log_stream(
        services,
        after,
        _filter(ingest_id),
        build=payload_frame,
        stop=_is_complete,
        headers={"X-Ingest-Id": ingest_id},
    )


async def _start(services: Services, request: IngestRequest) -> tuple[str, bool]:
    ingest_id, created = await services.ingest.start(request.url, request.channel_limit)
    services.jobs.wake()
    return ingest_id, created


async def _fresh_row(services: Services, ingest_id: str) -> IngestRow:
    head = await services.store.head()
    await services.projections.wait_for("ingests", head, within=2.0)
    async with services.engine.connect() as connection:
        row = await load_ingest(connection, ingest_id)
    if row is None:
        raise NotFoundException(detail=f"no ingest {ingest_id!r}")
    return row


class IngestController(Controller):
    """Seed-compatible endpoints."""

    path = "/ingest"
    tags = ["ingest"]

    @post("/stream", summary="Start (or join) an ingest and stream its progress", status_code=200)
    async def ingest_stream(
        self, services: ServicesDep, data: JSONBody[IngestRequest]
    ) -> Response[Any]:
        ingest_id, _ = await _start(services, data)
        return await _stream(services, ingest_id, None)

    @post("/", summary="Start (or join) an ingest and wait for its result", status_code=200)
    async def ingest(self, services: ServicesDep, data: JSONBody[IngestRequest]) -> dict[str, Any]:
        ingest_id, _ = await _start(services, data)
        result = await services.ingest.wait_complete(ingest_id)
        return {**result, "ingest_id": ingest_id}

    @get("/detect", summary="What kind of URL this is")
    async def detect(
        self, url: Annotated[str, QueryParameter(description="the URL to classify")]
    ) -> Detected:
        found = detect_url(url)
        return Detected(
            url=found.url, type=found.type, video_id=found.video_id, channel=found.channel
        )


class IngestsController(Controller):
    path = "/ingests"
    tags = ["ingest"]

    @post("/", summary="Start (or join) an ingest", status_code=202)
    async def create(self, services: ServicesDep, data: JSONBody[IngestRequest]) -> IngestAccepted:
        ingest_id, created = await _start(services, data)
        row = await _fresh_row(services, ingest_id)
        return IngestAccepted(
            ingest_id=ingest_id,
            status=row.status,
            stream_url=f"/ingests/{ingest_id}/stream",
            created=created,
        )

    @get("/", summary="Ingests, newest first")
    async def list(
        self,
        services: ServicesDep,
        status: Annotated[list[str] | None, QueryParameter(required=False)] = None,
        type: Annotated[list[str] | None, QueryParameter(required=False)] = None,
        parent_id: Annotated[str | None, QueryParameter(required=False, max_length=64)] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 50,
        before: Annotated[
            int | None,
            QueryParameter(
                ge=1, le=MAX_POSITION, required=False, description="a requested_position cursor"
            ),
        ] = None,
    ) -> list[IngestRow]:
        _check_values("status", status, INGEST_STATUSES)
        _check_values("type", type, INGEST_TYPES)
        head = await services.store.head()
        await services.projections.wait_for("ingests", head, within=2.0)
        async with services.engine.connect() as connection:
            return await list_ingests(
                connection,
                statuses=tuple(status or ()),
                types=tuple(type or ()),
                parent_id=parent_id,
                limit=limit,
                before=before,
            )

    @get("/{ingest_id:str}", summary="One ingest (optionally as it was at a log position)")
    async def get_one(
        self,
        services: ServicesDep,
        ingest_id: FromPath[str],
        as_of: Annotated[int | None, QueryParameter(ge=0, le=MAX_POSITION, required=False)] = None,
    ) -> IngestRow:
        if as_of is None:
            return await _fresh_row(services, ingest_id)
        state = fold_events(await services.ingest.events(ingest_id, until_position=as_of))
        if state is None:
            raise NotFoundException(detail=f"no ingest {ingest_id!r} at position {as_of}")
        return to_row(state)

    @get("/{ingest_id:str}/events", summary="The ingest's events, paged")
    async def events(
        self,
        services: ServicesDep,
        ingest_id: FromPath[str],
        after: Annotated[int, QueryParameter(ge=0, le=MAX_POSITION)] = 0,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    ) -> IngestEvents:
        if not await services.store.source_version(INGEST_STREAM, ingest_id):
            raise NotFoundException(detail=f"no ingest {ingest_id!r}")
        event_filter = _filter(ingest_id)
        page = await services.store.read_after(after, event_filter, limit)
        gone = await archived_within(services.store, after, page.scanned_to, event_filter)
        return IngestEvents(
            events=page.events,
            next_after=page.scanned_to,
            truncated=[TruncatedRange(**segment.describe()) for segment in gone],
        )

    @get("/{ingest_id:str}/stream", summary="Follow one ingest over SSE (resumable)")
    async def stream(
        self,
        services: ServicesDep,
        ingest_id: FromPath[str],
        last_event_id_header: LastEventIdHeader = None,
        last_event_id: LastEventIdQuery = None,
    ) -> Response[Any]:
        after = parse_last_event_id(last_event_id_header, last_event_id)
        return await _stream(services, ingest_id, after)

    @delete("/{ingest_id:str}", summary="Cancel an ingest", status_code=200)
    async def cancel(self, services: ServicesDep, ingest_id: FromPath[str]) -> IngestRow:
        try:
            await services.ingest.cancel(ingest_id)
        except UnknownIngest:
            raise NotFoundException(detail=f"no ingest {ingest_id!r}") from None
        except NotCancellable as exc:
            raise ClientException(
                detail=str(exc), status_code=409, extra={"ingest_id": ingest_id}
            ) from None
        services.jobs.cancel_local(ingest_id)
        return await _fresh_row(services, ingest_id)


def _check_values(name: str, values: list[str] | None, allowed: tuple[str, ...]) -> None:
    for value in values or ():
        if value not in allowed:
            raise ClientException(
                detail=f"{name} must be one of {', '.join(allowed)}, got {value[:40]!r}",
                extra={"field": name},
            )
