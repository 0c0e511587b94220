"""``/content``: what ingests stored, listed newest first, read whole, and searched."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, QueryParameter

from app.api.deps import ServicesDep
from app.content import (
    ContentItem,
    ContentPage,
    SearchResults,
    content_filter,
    get_content,
    list_content,
    search_content,
)
from app.content.catalog import MAX_LIMIT
from app.content.search import MAX_SEARCH_LIMIT

__all__ = ["ContentController"]

_Type = Annotated[
    list[str] | None,
    QueryParameter(required=False, description="video, article or channel (repeatable)"),
]
_Channel = Annotated[
    list[str] | None,
    QueryParameter(required=False, description="a channel's name or id (repeatable)"),
]
_Tag = Annotated[list[str] | None, QueryParameter(required=False, description="any of these tags")]
_Since = Annotated[
    str | None,
    QueryParameter(required=False, description="ingested at or after (ISO 8601)"),
]
_Until = Annotated[
    str | None,
    QueryParameter(required=False, description="ingested at or before (ISO 8601)"),
]


class ContentController(Controller):
    path = "/content"
    tags = ["content"]

    @get("/", summary="Stored items, newest first, a page at a time")
    async def list(
        self,
        services: ServicesDep,
        type: _Type = None,
        channel: _Channel = None,
        tag: _Tag = None,
        since: _Since = None,
        until: _Until = None,
        cursor: Annotated[
            str | None,
            QueryParameter(
                required=False, max_length=200, description="`next` of the previous page"
            ),
        ] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_LIMIT)] = 20,
    ) -> ContentPage:
        filters = content_filter(types=type, channels=channel, tags=tag, since=since, until=until)
        return await list_content(services.content, filters, cursor=cursor, limit=limit)

    @get("/search", summary="Full-text search, ranked by BM25, with highlighted passages")
    async def search(
        self,
        services: ServicesDep,
        q: Annotated[str, QueryParameter(description="words to find (all of them)")],
        type: _Type = None,
        channel: _Channel = None,
        tag: _Tag = None,
        since: _Since = None,
        until: _Until = None,
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_SEARCH_LIMIT)] = 20,
    ) -> SearchResults:
        filters = content_filter(types=type, channels=channel, tags=tag, since=since, until=until)
        return await search_content(services.content, q, filters, limit=limit)

    @get("/{content_id:str}", summary="One item whole: text, segments, tags, summary, origin")
    async def get_one(self, services: ServicesDep, content_id: FromPath[str]) -> ContentItem:
        item = await get_content(services.content, content_id)
        if item is None:
            raise NotFoundException(detail=f"no content {content_id[:200]!r}")
        return item
