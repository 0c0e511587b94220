"""Reading what was ingested: items newest first, a page at a time, and one item whole.

A page is a range of the listing (:mod:`app.content.schema`) from a cursor: the listing id of
the last item shown, so items ingested while a reader pages arrive before the first page and
never shift or repeat what the next page holds.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any, Final

from surrealdb import RecordID

from app.content.filters import ContentFilter, InvalidContentQuery
from app.content.items import (
    AgentRun,
    ChannelVideo,
    ContentItem,
    ContentPage,
    ContentSummary,
    Segment,
)
from app.content.schema import LISTING, order_of
from app.content.store import TABLES, ContentStore

__all__ = [
    "AGENT_FIELDS",
    "MAX_LIMIT",
    "get_content",
    "list_content",
    "summary_fields",
    "watch_url",
]

MAX_LIMIT: Final = 1000

#: Agent name -> the field of a content record naming the activity that last wrote to it.
AGENT_FIELDS: Final = {"tagger": "tagger_run", "summarizer": "summarizer_run"}

#: What a list shows of each item, read in one fetch of the record.
_SUMMARY_FIELDS: Final = (
    "title, url, ingested_at, tags, summary, channel, author, name, language, ingest_id, "
    "text_length, transcript_length, video_ids"
)


def watch_url(video_id: str, seconds: float) -> str:
    """The video opened at ``seconds`` (whole seconds, as YouTube takes them)."""
    return f"https://www.youtube.com/watch?v={video_id}&t={int(seconds)}s"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def summary_fields(item: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """The fields every view of an item shares, from its stored record."""
    kind = item.partition(":")[0]
    tags = record.get("tags")
    length = record.get("text_length") or record.get("transcript_length")
    if kind == "channel" and isinstance(record.get("video_ids"), list):
        length = None
    return {
        "id": item,
        "type": kind,
        "title": _text(record.get("title")) or _text(record.get("name")),
        "url": _text(record.get("url")),
        "ingested_at": _text(record.get("ingested_at")),
        "tags": [tag for tag in tags if isinstance(tag, str)] if isinstance(tags, list) else [],
        "summary": _text(record.get("summary")),
        "channel": _text(record.get("channel")) or (_text(record.get("name"))),
        "author": _text(record.get("author")),
        "language": _text(record.get("language")),
        "ingest_id": _text(record.get("ingest_id")),
        "text_length": length if isinstance(length, int) else None,
    }


def _encode_cursor(key: list[str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        key = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, UnicodeError, binascii.Error):
        key = None
    if (
        not isinstance(key, list)
        or len(key) != 2
        or not all(isinstance(part, str) for part in key)
        or not key[0].isdigit()
    ):
        raise InvalidContentQuery("cursor", "is not a cursor this service gave out") from None
    return key[0], key[1]


def _range(filters: ContentFilter, cursor: str | None) -> tuple[str, dict[str, Any]]:
    """The listing range to scan, newest first: from the cursor or ``until``, to ``since``."""
    start = ("", "")
    exclusive = False
    if filters.until is not None:
        start = (order_of(filters.until), "")
    if cursor is not None:
        after = _decode_cursor(cursor)
        if after >= start:
            start, exclusive = after, True
    variables: dict[str, Any] = {"from_order": start[0], "from_item": start[1]}
    source = f"{LISTING}:[$from_order, $from_item]{'>' if exclusive else ''}.."
    if filters.since is not None:
        # Everything ingested at ``since`` or later: orders up to and including its own.
        variables["to_order"] = f"{int(order_of(filters.since)) + 1:016d}"
        source += "[$to_order, '']"
    return source, variables


async def list_content(
    store: ContentStore,
    filters: ContentFilter,
    *,
    cursor: str | None = None,
    limit: int = 20,
) -> ContentPage:
    """Up to ``limit`` items newest first, after ``cursor``; ``next`` continues the list."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidContentQuery("limit", f"must be 1-{MAX_LIMIT}, got {limit}")
    filters = await filters.resolve(store)
    source, variables = _range(filters, cursor)
    where, bound = filters.conditions("item")
    variables |= bound
    if filters.types:
        where.append("type IN $types")
        variables["types"] = list(filters.types)
    statement = (
        f"SELECT record::id(id) AS key, item, item.{{{_SUMMARY_FIELDS}}} AS record FROM {source}"
    )
    if where:
        statement += " WHERE " + " AND ".join(where)
    # One more than asked: whether there is a next page, without an empty last one.
    statement += " LIMIT $limit"
    variables["limit"] = limit + 1
    (rows,) = await store.read("list content", statement, variables)
    rows = [row for row in rows or [] if isinstance(row.get("record"), dict)]
    items = [ContentSummary(**summary_fields(row["item"], row["record"])) for row in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        next_cursor = _encode_cursor(rows[limit - 1]["key"])
    return ContentPage(items=items, next=next_cursor)


def _segments(video_id: str, record: Mapping[str, Any]) -> list[Segment] | None:
    stored = record.get("segments")
    if not isinstance(stored, list):
        return None
    segments = []
    for segment in stored:
        if not isinstance(segment, dict) or not isinstance(segment.get("start"), int | float):
            continue
        start = float(segment["start"])
        segments.append(
            Segment(
                start=start,
                duration=float(segment.get("duration") or 0.0),
                text=str(segment.get("text") or ""),
                url=watch_url(video_id, start),
            )
        )
    return segments


def _videos(record: Mapping[str, Any], stored: set[str]) -> list[ChannelVideo] | None:
    listed = record.get("videos")
    if not isinstance(listed, list):
        return None
    videos = []
    for video in listed:
        if not isinstance(video, dict) or not isinstance(video.get("video_id"), str):
            continue
        video_id = video["video_id"]
        item = f"video:{video_id}"
        videos.append(
            ChannelVideo(
                video_id=video_id,
                title=_text(video.get("title")),
                published=_text(video.get("published")),
                url=f"https://www.youtube.com/watch?v={video_id}",
                id=item if item in stored else None,
            )
        )
    return videos


def _agent_runs(record: Mapping[str, Any]) -> list[AgentRun]:
    runs = []
    for agent, name in AGENT_FIELDS.items():
        run = record.get(name)
        if isinstance(run, dict) and isinstance(run.get("source_id"), str):
            runs.append(
                AgentRun(
                    agent=agent,
                    source_id=run["source_id"],
                    run_id=_text(run.get("run_id")),
                    at=_text(run.get("at")),
                )
            )
    return runs


async def get_content(store: ContentStore, item: str) -> ContentItem | None:
    """The item ``item`` (``video:<id>``, ``article:<key>``, ``channel:<id>``) whole, or None
    when there is no such item."""
    table, _, key = item.partition(":")
    if table not in TABLES or not key:
        return None
    record = await store.get(table, key)
    if record is None:
        return None
    stored: set[str] = set()
    if table == "channel" and isinstance(record.get("video_ids"), list):
        (found,) = await store.read(
            "read a channel's videos",
            "SELECT VALUE id FROM $videos",
            {
                "videos": [
                    RecordID("video", video_id)
                    for video_id in record["video_ids"]
                    if isinstance(video_id, str) and video_id
                ]
            },
        )
        stored = {found_id for found_id in found or [] if isinstance(found_id, str)}
    text = record.get("transcript") if table == "video" else record.get("text")
    return ContentItem(
        **summary_fields(item, record),
        published=_text(record.get("published")) or _text(record.get("date")),
        text=_text(text),
        segments=_segments(key, record) if table == "video" else None,
        videos=_videos(record, stored) if table == "channel" else None,
        thumbnail_url=_text(record.get("thumbnail_url")),
        final_url=_text(record.get("final_url")),
        agent_runs=_agent_runs(record),
    )
