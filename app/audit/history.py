"""The history a verification reads: the archive segments retention wrote, then the table's
rows with their chain values, in position order."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import msgspec
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.audit.verify import ArchivedRange, ChainedEvent
from app.eventlog.archives import ArchiveDamaged, Segment, check_segment, read_segment
from app.eventlog.tables import EVENT_COLUMNS, events
from app.events.envelope import Event

__all__ = ["archived_ranges", "read_chained", "table_rows"]


async def read_chained(engine: AsyncEngine, after: int, limit: int) -> list[ChainedEvent]:
    """At most ``limit`` rows above position ``after``, as the table holds them."""
    query = (
        select(*EVENT_COLUMNS, events.c.chain)
        .where(events.c.position > after)
        .order_by(events.c.position)
    )
    async with engine.connect() as connection:
        rows = (await connection.execute(query.limit(limit))).all()
    return [
        ChainedEvent(
            Event(row[0], row[1], row[2], row[3], row[4], row[5], row[6], msgspec.Raw(row[7])),
            None if row[8] is None else bytes(row[8]),
        )
        for row in rows
    ]


def table_rows(
    engine: AsyncEngine, loop: asyncio.AbstractEventLoop, *, page: int = 5000
) -> Iterator[ChainedEvent]:
    """Every row, a page at a time, read on ``loop`` for a caller on another thread (the
    verification is CPU work that would otherwise hold the loop)."""
    after = 0
    while True:
        future = asyncio.run_coroutine_threadsafe(read_chained(engine, after, page), loop)
        rows = future.result()
        yield from rows
        if len(rows) < page:
            return
        after = rows[-1].event.position


def archived_ranges(directory: Path, segments: list[Segment]) -> Iterator[ArchivedRange]:
    """``segments`` (as recorded, by first position) to verify, each file under ``directory``
    checked against its recorded checksum as it is reached."""
    for segment in segments:
        try:
            check_segment(directory, segment)
            problem = None
        except ArchiveDamaged as exc:
            problem = str(exc)
        yield ArchivedRange(
            segment.name,
            segment.first_position,
            segment.last_position,
            segment.count,
            _chain(segment.first_chain),
            _chain(segment.last_chain),
            partial(read_segment, directory, segment),
            problem,
        )


def _chain(value: str | None) -> bytes | None:
    return None if value is None else bytes.fromhex(value)
