"""The filters that a content list and a search share, checked before any query runs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from surrealdb import RecordID

from app.content.store import TABLES, ContentStore
from app.events.envelope import format_timestamp

__all__ = ["MAX_VALUES", "ContentFilter", "InvalidContentQuery", "content_filter"]

MAX_VALUES: Final = 20
MAX_VALUE_LENGTH: Final = 200


class InvalidContentQuery(ValueError):
    """A filter, cursor or query a reader gave is not one the store can answer."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class ContentFilter:
    types: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    since: str | None = None
    until: str | None = None
    # Filled by resolve(): the videos the named channels listed.
    channel_videos: tuple[RecordID, ...] = field(default=())

    def conditions(self, record: str) -> tuple[list[str], dict[str, Any]]:
        """SurrealQL conditions on a record, with their variables: ``record`` is the field
        that links to it (``item`` in the listing) or ``id`` on the record itself. Fixed
        text: every value is bound."""
        fields = "" if record == "id" else f"{record}."
        where: list[str] = []
        variables: dict[str, Any] = {}
        if self.tags:
            where.append(f"{fields}tags CONTAINSANY $tags")
            variables["tags"] = list(self.tags)
        if self.channels:
            where.append(
                f"({fields}channel IN $channels OR {fields}channel_id IN $channels"
                f" OR {fields}name IN $channels OR {record} IN $channel_videos)"
            )
            variables["channels"] = list(self.channels)
            variables["channel_videos"] = list(self.channel_videos)
        return where, variables

    async def resolve(self, store: ContentStore) -> ContentFilter:
        """This filter with the videos of its channels looked up (by channel id or name)."""
        if not self.channels:
            return self
        found = await store.read(
            "look up channels",
            "SELECT VALUE video_ids FROM channel"
            " WHERE channel_id IN $channels OR name IN $channels",
            {"channels": list(self.channels)},
        )
        video_ids = {
            video_id
            for ids in (found[0] or [])
            if isinstance(ids, list)
            for video_id in ids
            if isinstance(video_id, str) and video_id
        }
        videos = tuple(RecordID("video", video_id) for video_id in sorted(video_ids))
        return ContentFilter(self.types, self.channels, self.tags, self.since, self.until, videos)


def _values(name: str, values: Sequence[str] | None) -> tuple[str, ...]:
    if not values:
        return ()
    if len(values) > MAX_VALUES:
        raise InvalidContentQuery(name, f"at most {MAX_VALUES} values, got {len(values)}")
    for value in values:
        if not value or len(value) > MAX_VALUE_LENGTH:
            raise InvalidContentQuery(name, f"each value must be 1-{MAX_VALUE_LENGTH} characters")
    return tuple(dict.fromkeys(values))


def _moment(name: str, value: str | None) -> str | None:
    """``value`` as the store writes ingest times (UTC, milliseconds, ``Z``)."""
    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidContentQuery(
            name, f"must be an ISO 8601 time like 2025-01-24T12:00:00Z, got {value[:40]!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return format_timestamp(moment)


def content_filter(
    *,
    types: Sequence[str] | None = None,
    channels: Sequence[str] | None = None,
    tags: Sequence[str] | None = None,
    since: str | None = None,
    until: str | None = None,
) -> ContentFilter:
    """A checked filter; :class:`InvalidContentQuery` names the first value refused."""
    checked_types = _values("type", types)
    for kind in checked_types:
        if kind not in TABLES:
            raise InvalidContentQuery(
                "type", f"must be one of {', '.join(sorted(TABLES))}, got {kind[:40]!r}"
            )
    start, end = _moment("since", since), _moment("until", until)
    if start is not None and end is not None and start > end:
        raise InvalidContentQuery("since", f"{since} is later than until {until}")
    return ContentFilter(
        types=checked_types,
        channels=_values("channel", channels),
        tags=_values("tag", tags),
        since=start,
        until=end,
    )
