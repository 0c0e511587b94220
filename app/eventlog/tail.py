"""Replay from a position, then follow the log live, with no gap and no duplicate."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal, NamedTuple, overload

from sqlalchemy import ColumnElement
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from app.eventlog.archives import Segment, list_segments, segment_may_match
from app.eventlog.filters import EventFilter
from app.eventlog.notify import LogEntry, Sink
from app.eventlog.store import EventStore, FramePage, Page, rows_within

__all__ = ["Truncated", "archived_within", "entry_matches", "replay_then_tail"]

logger = logging.getLogger(__name__)

PAGE_BYTES = 1024 * 1024
FIRST_PAGE = 100


class Truncated(NamedTuple):
    """Events the reader has not had were removed by retention: they are in these archive
    segments (by first position). The events that follow are the oldest retained ones."""

    segments: list[Segment]


@overload
def replay_then_tail(
    store: EventStore,
    after: int,
    event_filter: EventFilter | None = None,
    *,
    idle_timeout: float | None = None,
    chunk: int = 4000,
    frame: None = None,
    report_truncated: Literal[False] = False,
    sink: Sink | None = None,
) -> AsyncIterator[list[LogEntry]]: ...


@overload
def replay_then_tail(
    store: EventStore,
    after: int,
    event_filter: EventFilter | None = None,
    *,
    idle_timeout: float | None = None,
    chunk: int = 4000,
    frame: None = None,
    report_truncated: Literal[True],
    sink: Sink | None = None,
) -> AsyncIterator[list[LogEntry] | Truncated]: ...


@overload
def replay_then_tail(
    store: EventStore,
    after: int,
    event_filter: EventFilter | None = None,
    *,
    idle_timeout: float | None = None,
    chunk: int = 4000,
    frame: ColumnElement[str] | None,
    report_truncated: bool = False,
    sink: Sink | None = None,
) -> AsyncIterator[list[LogEntry] | FramePage | Truncated]: ...


async def replay_then_tail(
    store: EventStore,
    after: int,
    event_filter: EventFilter | None = None,
    *,
    idle_timeout: float | None = None,
    chunk: int = 4000,
    frame: ColumnElement[str] | None = None,
    report_truncated: bool = False,
    sink: Sink | None = None,
) -> AsyncIterator[list[LogEntry] | FramePage | Truncated]:
    """Yield lists of matching entries with positions above ``after``, in position order.

    Reads the table until caught up with the feed's window, then takes entries from the
    window as the head advances. A reader that falls behind the window (slow, or just
    resumed far back) reads the table again; nobody waits for it. When nothing arrives for
    ``idle_timeout`` seconds an empty list is yielded, so the caller can send a heartbeat.

    Given ``frame`` (a SQL expression for an event's frame), the pages read from the table
    come as :class:`FramePage` where the store can build them (:meth:`EventStore.
    frames_from_rows`), in place of lists of entries.

    Given ``report_truncated``, a page read from the table that reaches into events
    retention removed (and this reader did not have) is preceded by a :class:`Truncated`
    naming the archive segments holding them. The segments are looked up after the page is
    read: the rows and the segment's record go in one transaction, so a page that misses
    rows is always followed by the segment holding them.

    Given a ``sink``, the tail is parked while caught up (:meth:`~app.eventlog.notify.
    LogFeed.wait`): the feed hands the sink each advance itself, filter and all being the
    sink's to apply, and the iterator yields only what the sink could not take, heartbeats,
    and replays.
    """
    event_filter = event_filter or EventFilter()
    unfiltered = event_filter.is_empty
    read: Callable[[int, int], Awaitable[Page | FramePage]]
    if frame is not None and store.frames_from_rows(event_filter):
        framed = frame

        def read(after: int, limit: int) -> Awaitable[Page | FramePage]:
            return store.read_frames_after(after, event_filter, limit, framed)
    else:

        def read(after: int, limit: int) -> Awaitable[Page | FramePage]:
            return store.read_after(after, event_filter, limit)

    feed = store.feed
    subscription = feed.subscribe(after, sink)
    # Rows per table read, sized so that a page holds about PAGE_BYTES: a subscriber that is
    # far behind (or stalled) holds one page, whatever the payloads' size. Up to ``chunk``
    # rows: each read costs a few hops to the database and back, which larger pages of small
    # events spread thinner.
    limit = min(chunk, FIRST_PAGE)
    # While a page is written to the subscriber, the next one is read (the query runs on the
    # database's side, or SQLite's thread, alongside): a replay does not wait for each read.
    ahead: asyncio.Future[Page | FramePage] | None = None
    ahead_after = -1
    announced: set[str] = set()
    try:
        last = after
        while True:
            # Resumed after a yield: the caller has taken (for SSE: written) everything so far.
            subscription.delivered = last
            entries = feed.entries_after(last)
            if entries is None:
                try:
                    if ahead is not None and ahead_after == last:
                        page = await ahead
                    else:
                        page = await read(last, limit)
                except (DBAPIError, OSError) as exc:
                    # The database is away (a restart): keep the subscriber and its place, tick
                    # so heartbeats still flow, and read again shortly.
                    logger.warning("tail read failed (%s); retrying", exc)
                    await asyncio.sleep(min(idle_timeout or 1.0, 1.0))
                    yield []
                    continue
                finally:
                    _dropped(ahead)
                    ahead = None
                if report_truncated and page.scanned_to > last:
                    gone = await _archived(store, last, page.scanned_to, event_filter, announced)
                    if gone:
                        yield Truncated(gone)
                last = max(last, page.scanned_to)
                more = page.scanned_to < page.head
                count = page.frame_count if isinstance(page, FramePage) else len(page.events)
                if count:
                    limit = min(chunk, rows_within(PAGE_BYTES, page))
                    if more:
                        ahead = asyncio.ensure_future(read(last, limit))
                        ahead_after = last
                    yield (
                        page
                        if isinstance(page, FramePage)
                        else [LogEntry(event, shared=False) for event in page.events]
                    )
                # Not held once written: an idle tail would keep its last page alive.
                del page
                continue
            if entries:
                last = entries[-1].position
                if not unfiltered:
                    entries = [e for e in entries if entry_matches(event_filter, e)]
                if entries:
                    yield entries
                continue
            # Nothing between the look at the head above and this wait yields to the loop, so
            # no append can land unseen in between.
            woken = await feed.wait(subscription, last, idle_timeout)
            # A parked tail's sink may have been handed entries meanwhile.
            last = subscription.delivered
            if not woken:
                yield []
    finally:
        _dropped(ahead)
        feed.unsubscribe(subscription)


async def archived_within(
    store: EventStore, after: int, through: int, event_filter: EventFilter
) -> list[Segment]:
    """The archive segments holding events in ``(after, through]`` that ``event_filter``
    may want, by first position."""
    if through <= after:
        return []

    async def read(connection: AsyncConnection) -> list[Segment]:
        return await list_segments(connection, after, through)

    return [
        segment
        for segment in await store.read_with(read)
        if segment_may_match(segment, event_filter)
    ]


async def _archived(
    store: EventStore, after: int, through: int, event_filter: EventFilter, announced: set[str]
) -> list[Segment]:
    """As :func:`archived_within`, less the segments already ``announced`` (then added)."""
    found = [
        segment
        for segment in await archived_within(store, after, through, event_filter)
        if segment.name not in announced
    ]
    announced.update(segment.name for segment in found)
    return found


def _dropped(ahead: asyncio.Future[Page | FramePage] | None) -> None:
    """Let go of a read ahead (finished, or no longer wanted)."""
    if ahead is None:
        return
    if not ahead.done():
        ahead.cancel()  # the read itself runs to its end (see EventStore._read_to_the_end)
    elif not ahead.cancelled():
        ahead.exception()  # retrieved: a failed read ahead is not reported as unhandled


def entry_matches(event_filter: EventFilter, entry: LogEntry) -> bool:
    """Whether ``event_filter`` wants the feed's ``entry``."""
    # The entry's decoded payload is cached, so a thousand filtered tails decode it once.
    payload = entry.payload() if event_filter.agent_names else None
    return event_filter.matches(entry.event, payload)
