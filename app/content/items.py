"""What a reader gets back from the content store: items, pages of them, and search hits.

These are the wire shapes of ``/content`` and what the Python client decodes them into.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "AgentRun",
    "ChannelVideo",
    "ContentItem",
    "ContentPage",
    "ContentSummary",
    "SearchHit",
    "SearchResults",
    "Segment",
]


class Segment(msgspec.Struct, frozen=True):
    """One caption of a transcript: when it starts (seconds), its words, and the video
    opened at that second."""

    start: float
    duration: float
    text: str
    url: str


class AgentRun(msgspec.Struct, frozen=True):
    """The agent activity that last wrote to an item (``/agents/{source_id}``), and the
    coordinator run it belonged to."""

    agent: str
    source_id: str
    run_id: str | None = None
    at: str | None = None


class ChannelVideo(msgspec.Struct, frozen=True):
    """A video a channel listed; ``id`` names its content item once it is stored."""

    video_id: str
    title: str | None = None
    published: str | None = None
    url: str | None = None
    id: str | None = None


class ContentSummary(msgspec.Struct, kw_only=True):
    """An item as a list shows it."""

    id: str
    type: str
    title: str | None = None
    url: str | None = None
    ingested_at: str | None = None
    tags: list[str] = msgspec.field(default_factory=list)
    summary: str | None = None
    channel: str | None = None
    author: str | None = None
    language: str | None = None
    ingest_id: str | None = None
    text_length: int | None = None


class ContentItem(ContentSummary, kw_only=True):
    """An item whole: its text, a video's transcript segments, a channel's videos, and where
    it came from (the ingest, ``/ingests/{ingest_id}``; the agent runs)."""

    published: str | None = None
    text: str | None = None
    segments: list[Segment] | None = None
    videos: list[ChannelVideo] | None = None
    thumbnail_url: str | None = None
    final_url: str | None = None
    agent_runs: list[AgentRun] = msgspec.field(default_factory=list)


class ContentPage(msgspec.Struct):
    """Items newest first; ``next`` continues after the last one (None: no more)."""

    items: list[ContentSummary]
    next: str | None = None


class SearchHit(msgspec.Struct, kw_only=True):
    """An item that matched, its BM25 score, the passage that matched (HTML-escaped, the
    matched words in ``<mark>``), and for a transcript the segment that holds it."""

    id: str
    type: str
    title: str | None = None
    url: str | None = None
    score: float
    snippet: str
    segment: Segment | None = None
    channel: str | None = None
    author: str | None = None
    ingested_at: str | None = None
    tags: list[str] = msgspec.field(default_factory=list)


class SearchResults(msgspec.Struct):
    query: str
    hits: list[SearchHit]
