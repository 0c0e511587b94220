"""Where ingested content lands (the SurrealDB content store, the on-disk archive), and how
it is read back: listed newest first, read whole, searched."""

from __future__ import annotations

from app.content.archive import Archive
from app.content.catalog import AGENT_FIELDS, get_content, list_content, watch_url
from app.content.filters import ContentFilter, InvalidContentQuery, content_filter
from app.content.items import (
    AgentRun,
    ChannelVideo,
    ContentItem,
    ContentPage,
    ContentSummary,
    SearchHit,
    SearchResults,
    Segment,
)
from app.content.search import search_content
from app.content.store import (
    TABLES,
    ContentStore,
    ContentStoreLocked,
    ContentUnavailable,
    article_key,
    normalize_article_url,
)

__all__ = [
    "AGENT_FIELDS",
    "TABLES",
    "AgentRun",
    "Archive",
    "ChannelVideo",
    "ContentFilter",
    "ContentItem",
    "ContentPage",
    "ContentStore",
    "ContentStoreLocked",
    "ContentSummary",
    "ContentUnavailable",
    "InvalidContentQuery",
    "SearchHit",
    "SearchResults",
    "Segment",
    "article_key",
    "content_filter",
    "get_content",
    "list_content",
    "normalize_article_url",
    "search_content",
    "watch_url",
]
