"""Archive segments: events removed from the table by retention, kept as files.

A segment is one purge batch's events, in position order, as gzip-compressed NDJSON in the
export format (one envelope a line, as ``export`` writes them), named by its first and last
position. Its manifest (a JSON file beside it) holds the range, the count, the sha256 of the
segment file, and which streams and events it holds. Both are written to a temporary name,
synced, renamed, and the directory synced: the segment first, then the manifest, and both
before the rows are removed. A segment is complete only when its manifest is there and the
file's checksum matches it, so a crash at any point leaves either no segment, or one that
does not look complete (and its events still in the table), or a complete one.

The ``archived_segments`` table records each segment in the same transaction that removes its
rows, so a reader that finds rows missing also finds the segment that holds them.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import io
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import BigInteger, Column, Index, Integer, String, Table, Text, select
from sqlalchemy.ext.asyncio import AsyncConnection

from app.backends.schema import POSITION
from app.database import metadata
from app.eventlog.filters import EventFilter
from app.eventlog.store import read_page
from app.events.envelope import Event, decode_event, encode_event, utc_now
from app.runtime import files

__all__ = [
    "ArchiveDamaged",
    "Segment",
    "archived_segments",
    "build_segment",
    "check_segment",
    "history",
    "list_segments",
    "read_segment",
    "remove_unrecorded",
    "segment_may_match",
    "write_segment",
]

archived_segments = Table(
    "archived_segments",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("first_position", POSITION, nullable=False),
    Column("last_position", POSITION, nullable=False),
    Column("count", Integer, nullable=False),
    # Of the segment file, hex.
    Column("sha256", String(64), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    # {"stream": {"event": count}}: what a filtered reader may have missed.
    Column("streams", Text, nullable=False),
    Column("archived_at", String(24), nullable=False),
    # The chain values (hex) of the segment's first and last events, as the log held them;
    # None for events appended without a chain.
    Column("first_chain", String(64), nullable=True),
    Column("last_chain", String(64), nullable=True),
    # When the last of its rows was removed from the table; None while a purge removes them
    # (a few at a time), or was stopped doing so.
    Column("removed_at", String(24), nullable=True),
    Index("ix_archived_segments_last_position", "last_position"),
)

_SUFFIX = ".ndjson.gz"
_MANIFEST_SUFFIX = ".manifest.json"


class ArchiveDamaged(Exception):
    """A segment a read needs is missing, or does not match its manifest."""


class Segment(msgspec.Struct, frozen=True, kw_only=True):
    """A segment's manifest (and its row in ``archived_segments``)."""

    name: str
    first_position: int
    last_position: int
    count: int
    sha256: str
    bytes: int
    streams: dict[str, dict[str, int]]
    archived_at: str
    #: The chain values (hex) of the first and last events (app/events/chain.py), or None.
    first_chain: str | None = None
    last_chain: str | None = None
    #: How the segment's lines are written: the export format, one envelope a line.
    format: str = "ndjson.gz envelopes (export format)"

    def describe(self) -> dict[str, Any]:
        """The range, as a read that reaches into it names it."""
        return {
            "first": self.first_position,
            "last": self.last_position,
            "count": self.count,
            "segment": self.name,
        }


_manifest_encoder = msgspec.json.Encoder()
_manifest_decoder = msgspec.json.Decoder(Segment)
_streams_decoder = msgspec.json.Decoder(dict[str, dict[str, int]])


def segment_name(first: int, last: int) -> str:
    # Zero-padded: names sort as their ranges do.
    return f"events-{first:020d}-{last:020d}{_SUFFIX}"


def manifest_path(directory: Path, name: str) -> Path:
    return directory / (name.removesuffix(_SUFFIX) + _MANIFEST_SUFFIX)


def build_segment(
    events: Sequence[Event], chains: tuple[bytes | None, bytes | None] = (None, None)
) -> tuple[Segment, bytes]:
    """The segment file's bytes for ``events`` (in position order), and its manifest;
    ``chains``: the chain values of the first and last events."""
    lines = b"".join(encode_event(event) + b"\n" for event in events)
    # mtime=0: the same events make the same bytes (and checksum), whenever written.
    data = gzip.compress(lines, compresslevel=6, mtime=0)
    streams: dict[str, dict[str, int]] = {}
    for event in events:
        names = streams.setdefault(event.stream, {})
        names[event.event] = names.get(event.event, 0) + 1
    first, last = events[0].position, events[-1].position
    segment = Segment(
        name=segment_name(first, last),
        first_position=first,
        last_position=last,
        count=len(events),
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        streams=streams,
        archived_at=utc_now(),
        first_chain=None if chains[0] is None else chains[0].hex(),
        last_chain=None if chains[1] is None else chains[1].hex(),
    )
    return segment, data


def write_segment(directory: Path, segment: Segment, data: bytes) -> None:
    """The segment, then its manifest, each written atomically and synced (blocking)."""
    files.write_atomically(directory / segment.name, data)
    files.write_atomically(
        manifest_path(directory, segment.name), _manifest_encoder.encode(segment) + b"\n"
    )


def check_segment(directory: Path, segment: Segment) -> bytes:
    """The segment file's bytes, checked against ``segment`` (its recorded manifest)."""
    path = directory / segment.name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArchiveDamaged(
            f"segment {segment.name} (positions {segment.first_position}-"
            f"{segment.last_position}) is not in {directory}"
        ) from None
    if hashlib.sha256(data).hexdigest() != segment.sha256:
        raise ArchiveDamaged(
            f"segment {segment.name} does not match its manifest (sha256 differs): it was "
            "changed or damaged after it was written"
        )
    return data


def read_segment(directory: Path, segment: Segment, after: int = 0) -> Iterator[Event]:
    """The segment's events above ``after``, checked against its manifest first."""
    data = check_segment(directory, segment)
    with gzip.open(io.BytesIO(data)) as lines:
        for line in lines:
            event = decode_event(line)
            if event.position > after:
                yield event


def on_disk(directory: Path) -> list[Segment]:
    """The complete segments under ``directory``: each with its manifest, by range."""
    found = []
    for path in sorted(directory.glob(f"*{_MANIFEST_SUFFIX}")):
        try:
            segment = _manifest_decoder.decode(path.read_bytes())
        except (OSError, msgspec.MsgspecError):
            continue
        found.append(segment)
    return found


def remove_unrecorded(directory: Path, recorded: set[str]) -> list[str]:
    """Remove what a purge interrupted before its rows were removed left behind: temporary
    files, and segments (with their manifests) the table does not record. Their events are
    still in the table. Returns the names removed."""
    removed: list[str] = []
    if not directory.is_dir():
        return removed
    for path in sorted(directory.iterdir()):
        name = path.name
        if name.startswith(".") and name.endswith(".tmp"):
            path.unlink(missing_ok=True)
            removed.append(name)
        elif name.endswith(_SUFFIX) and name not in recorded:
            manifest_path(directory, name).unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            removed.append(name)
        elif name.endswith(_MANIFEST_SUFFIX):
            segment = name.removesuffix(_MANIFEST_SUFFIX) + _SUFFIX
            if segment not in recorded:
                path.unlink(missing_ok=True)
                removed.append(name)
    return removed


def _segment(row: Any) -> Segment:
    return Segment(
        name=row.name,
        first_position=int(row.first_position),
        last_position=int(row.last_position),
        count=int(row.count),
        sha256=row.sha256,
        bytes=int(row.bytes),
        streams=_streams_decoder.decode(row.streams),
        archived_at=row.archived_at,
        first_chain=row.first_chain,
        last_chain=row.last_chain,
    )


def segment_row(segment: Segment) -> dict[str, Any]:
    return {
        "name": segment.name,
        "first_position": segment.first_position,
        "last_position": segment.last_position,
        "count": segment.count,
        "sha256": segment.sha256,
        "bytes": segment.bytes,
        "streams": _manifest_encoder.encode(segment.streams).decode(),
        "archived_at": segment.archived_at,
        "first_chain": segment.first_chain,
        "last_chain": segment.last_chain,
    }


async def list_segments(
    connection: AsyncConnection,
    after: int = 0,
    through: int | None = None,
    *,
    unfinished: bool = False,
) -> list[Segment]:
    """The recorded segments holding events above ``after`` (and, given ``through``,
    starting at or below it; given ``unfinished``, only those whose rows are not all
    removed yet), by first position."""
    query = select(archived_segments).where(archived_segments.c.last_position > after)
    if unfinished:
        query = query.where(archived_segments.c.removed_at.is_(None))
    if through is not None:
        query = query.where(archived_segments.c.first_position <= through)
    rows = (await connection.execute(query.order_by(archived_segments.c.first_position))).all()
    return [_segment(row) for row in rows]


def segment_may_match(segment: Segment, event_filter: EventFilter) -> bool:
    """Whether ``segment`` may hold events ``event_filter`` lets through (its streams and
    event names are known; its sources are not)."""
    for stream, names in segment.streams.items():
        if event_filter.streams and stream not in event_filter.streams:
            continue
        if not event_filter.events or any(name in event_filter.events for name in names):
            return True
    return False


async def history(
    connection: AsyncConnection,
    directory: Path,
    after: int = 0,
    event_filter: EventFilter | None = None,
    *,
    through: int | None = None,
    page: int = 5000,
) -> AsyncIterator[list[Event]]:
    """Every event above ``after`` that was ever appended, in position order, in lists: the
    archive segments' events merged with the table's, up to ``through`` (default: the
    table's head when it starts). Raises :class:`ArchiveDamaged` for a segment it needs
    that is missing or damaged."""
    event_filter = event_filter or EventFilter()
    segments = [
        segment
        for segment in await list_segments(connection, after)
        if segment_may_match(segment, event_filter)
    ]
    archived = _merged(directory, segments, after, event_filter)
    pending = next(archived, None)
    position = after
    head: int | None = through
    while True:
        table = await read_page(connection, position, event_filter, limit=page)
        head = table.head if head is None else head
        if position >= head:
            break
        until = min(table.scanned_to, head)
        out: list[Event] = []
        for event in table.events:
            if event.position > head:
                break
            while pending is not None and pending.position < event.position:
                out.append(pending)
                pending = next(archived, None)
            if pending is not None and pending.position == event.position:
                # Archived, its row not removed yet (a purge removes a segment's rows a few
                # at a time): once.
                pending = next(archived, None)
            out.append(event)
        # Archived events below the next table page's start go before it.
        while pending is not None and pending.position <= until:
            out.append(pending)
            pending = next(archived, None)
        if out:
            yield out
        if until >= head or table.scanned_to <= position:
            break
        position = until
    rest: list[Event] = []
    while pending is not None and pending.position <= head:
        rest.append(pending)
        if len(rest) >= page:
            yield rest
            rest = []
        pending = next(archived, None)
    if rest:
        yield rest


def _merged(
    directory: Path, segments: list[Segment], after: int, event_filter: EventFilter
) -> Iterator[Event]:
    """The segments' matching events above ``after`` in position order; a segment is opened
    only when the merge reaches its first position (ranges of segments may overlap: rules of
    different ages expire events out of order)."""
    waiting = sorted(segments, key=lambda segment: segment.first_position)
    heap: list[tuple[int, int, Event, Iterator[Event]]] = []
    index = 0
    opened = 0

    def open_next() -> None:
        nonlocal index, opened
        events = read_segment(directory, waiting[index], after)
        index += 1
        for event in events:
            if event_filter.matches(event):
                heapq.heappush(heap, (event.position, opened, event, events))
                opened += 1
                return

    while index < len(waiting) or heap:
        while index < len(waiting) and (not heap or waiting[index].first_position <= heap[0][0]):
            open_next()
        if not heap:
            continue
        _, _, event, events = heapq.heappop(heap)
        yield event
        for following in events:
            if event_filter.matches(following):
                heapq.heappush(heap, (following.position, opened, following, events))
                opened += 1
                break
