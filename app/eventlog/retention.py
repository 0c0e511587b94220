"""Retention: events past their rule's age are archived, then removed from the table.

A purge works in batches, each of them the lowest expired positions (at most
``RETENTION_BATCH_EVENTS``): read in a short read transaction, written as an archive segment
(:mod:`app.eventlog.archives`: synced and renamed, manifest last) while nothing is locked,
then removed, and recorded in ``archived_segments``, in one short write transaction made by
the log's appender (:meth:`~app.eventlog.EventStore.write_guarded`): where the log has one
write lock (SQLite) between two of its transactions, at a moment when no append is waiting
(a yielding write), so a purge fills the gaps between appends instead of fighting them for the
lock, and an append waits for one short removal at most.

A source's newest event is never removed: the appender counts a source's versions on from it,
and it is what a reader of the source sees last. So the log's head (the newest event of its
source) never moves back, and no position or version is ever given out twice.

One instance purges at a time (a lease in ``job_leases``); what an interrupted purge left in
the archive directory (a temporary file, a segment whose rows were not removed) is removed
before the next one starts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import (
    ColumnElement,
    and_,
    bindparam,
    delete,
    exists,
    false,
    func,
    not_,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import aliased

from app.backends import GuardedWrite
from app.config.retention import ANY, RetentionRule
from app.database.statements import compile_write
from app.eventlog import archives
from app.eventlog.archives import Segment, archived_segments
from app.eventlog.store import EventStore, to_event
from app.eventlog.tables import EVENT_COLUMNS, events
from app.events.envelope import Event, format_timestamp, utc_now

__all__ = [
    "Expired",
    "PurgeResult",
    "Retention",
    "expired_events",
    "pending_by_rule",
    "rule_conditions",
]

logger = logging.getLogger(__name__)

#: The lease one instance's purge holds (``job_leases``).
LEASE = "log-retention"


class Expired(NamedTuple):
    """A batch of expired events, and the chain values of its first and last."""

    events: list[Event]
    chains: tuple[bytes | None, bytes | None]


class PurgeResult(NamedTuple):
    removed: int
    segments: list[Segment]


def _matches(rule: RetentionRule) -> ColumnElement[bool]:
    conditions = []
    if rule.stream != ANY:
        conditions.append(events.c.stream == rule.stream)
    if rule.event != ANY:
        conditions.append(events.c.event == rule.event)
    return and_(*conditions) if conditions else ~false()


def _overlap(a: RetentionRule, b: RetentionRule) -> bool:
    """Whether some event is named by both rules."""
    return (ANY in (a.stream, b.stream) or a.stream == b.stream) and (
        ANY in (a.event, b.event) or a.event == b.event
    )


def rule_conditions(
    rules: Sequence[RetentionRule], now: datetime
) -> list[tuple[RetentionRule, ColumnElement[bool]]]:
    """Each rule with an age, and the condition its expired events meet: named by it and by
    no more specific rule, older than its age."""
    found = []
    for rule in rules:
        if rule.max_age_seconds is None:
            continue
        wins = [
            other
            for other in rules
            if other.specificity > rule.specificity and _overlap(rule, other)
        ]
        cutoff = format_timestamp(now - timedelta(seconds=rule.max_age_seconds))
        found.append(
            (
                rule,
                and_(
                    _matches(rule),
                    *[not_(_matches(other)) for other in wins],
                    events.c.timestamp < cutoff,
                ),
            )
        )
    return found


def _not_newest() -> ColumnElement[bool]:
    """The event is not its source's newest (which is kept: see the module's docstring)."""
    newer = aliased(events)
    return exists().where(
        newer.c.stream == events.c.stream,
        newer.c.source_id == events.c.source_id,
        newer.c.version > events.c.version,
    )


#: Rows per read of expired events: a read's rows become events on the event loop, so a
#: segment's worth is read in short steps that each hold the loop briefly.
_READ_ROWS = 500


async def expired_events(
    connection: AsyncConnection, rules: Sequence[RetentionRule], now: datetime, limit: int
) -> Expired:
    """The lowest expired positions, at most ``limit`` of them, in position order."""
    conditions = [condition for _, condition in rule_conditions(rules, now)]
    if not conditions:
        return Expired([], (None, None))
    found: list[Event] = []
    chains: list[bytes | None] = [None, None]
    after = 0
    while len(found) < limit:
        wanted = min(_READ_ROWS, limit - len(found))
        query = (
            select(*EVENT_COLUMNS, events.c.chain)
            .where(events.c.position > after, or_(*conditions), _not_newest())
            .order_by(events.c.position)
            .limit(wanted)
        )
        rows = (await connection.execute(query)).all()
        if not rows:
            break
        if not found:
            chains[0] = rows[0][8]
        chains[1] = rows[-1][8]
        found.extend(to_event(row[:8]) for row in rows)
        after = rows[-1][0]
        if len(rows) < wanted:
            break
    return Expired(found, (chains[0], chains[1]))


async def pending_by_rule(
    connection: AsyncConnection, rules: Sequence[RetentionRule], now: datetime
) -> list[tuple[RetentionRule, int]]:
    """How many events each rule with an age would remove now."""
    found = []
    for rule, condition in rule_conditions(rules, now):
        query = select(func.count()).select_from(events).where(condition, _not_newest())
        found.append((rule, int((await connection.execute(query)).scalar_one())))
    return found


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Retention:
    """Applies the rules to ``store``'s log, archiving under ``directory``: segments of
    ``batch_events`` events, whose rows are removed ``delete_rows`` at a time."""

    def __init__(
        self,
        store: EventStore,
        rules: Sequence[RetentionRule],
        directory: Path,
        *,
        batch_events: int = 10_000,
        delete_rows: int = 100,
        pause: float = 1.0,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._store = store
        self._engine = store.engine
        self.rules = list(rules)
        self.directory = Path(directory)
        self._batch = batch_events
        self._delete_rows = delete_rows
        #: After each removal, a pause this many times as long as it took.
        self._pause = pause
        self._clock = clock
        self._statements = _Statements(store)

    async def purge(
        self,
        *,
        max_batches: int | None = None,
        between_batches: Callable[[], Awaitable[object]] | None = None,
    ) -> PurgeResult:
        """Archive and remove what the rules say has expired, batch by batch, until nothing
        has (or ``max_batches`` are done). The caller holds the purge's lease (and renews it
        in ``between_batches``)."""
        await self._finish_interrupted()
        await self._remove_leftovers()
        removed = 0
        written: list[Segment] = []
        now = self._clock()
        while max_batches is None or len(written) < max_batches:
            async with self._engine.connect() as connection:
                expired = await expired_events(connection, self.rules, now, self._batch)
            batch = expired.events
            if not batch:
                break
            segment = await self._archive(expired)
            if not await self._remove(segment, [event.position for event in batch], new=True):
                logger.warning("segment %s was recorded by another purge; stopping", segment.name)
                break
            removed += len(batch)
            written.append(segment)
            if between_batches is not None:
                await between_batches()
            logger.info(
                "archived and removed %d events (positions %d-%d) into %s",
                segment.count,
                segment.first_position,
                segment.last_position,
                segment.name,
            )
        return PurgeResult(removed, written)

    async def _archive(self, expired: Expired) -> Segment:
        """The batch as a complete segment on disk (built and written off the event loop)."""
        segment, data = await asyncio.to_thread(
            archives.build_segment, expired.events, expired.chains
        )
        await asyncio.to_thread(archives.write_segment, self.directory, segment, data)
        return segment

    async def _remove(self, segment: Segment, positions: list[int], *, new: bool) -> bool:
        """Remove the rows at ``positions`` (held by ``segment``, complete on disk), a few at
        a time, each few in a short transaction made by the log's appender: appends wait
        for one of them at most. The first records the segment (unless it is recorded
        already: not ``new``), the last marks it removed. False, nothing done, if a ``new``
        segment is recorded already."""
        chunks = [
            positions[start : start + self._delete_rows]
            for start in range(0, len(positions), self._delete_rows)
        ] or [[]]
        loop = asyncio.get_running_loop()
        for index, chunk in enumerate(chunks):
            started = loop.time()
            write = self._statements.removal(
                segment,
                chunk,
                record=new and index == 0,
                done=utc_now() if index == len(chunks) - 1 else None,
            )
            if not await self._store.write_guarded(write):
                return False
            if chunk:
                self._store.feed.forget_through(chunk[-1])
            # As long again for the appends: a purge takes at most about half the writer's
            # time, however long it runs.
            await asyncio.sleep((loop.time() - started) * self._pause)
        return True

    async def _finish_interrupted(self) -> None:
        """Remove the rows a recorded segment still left in the table (a purge stopped
        between two of its transactions): its events are complete in the segment."""
        async with self._engine.connect() as connection:
            unfinished = await archives.list_segments(connection, unfinished=True)
        for segment in unfinished:
            try:
                positions = await asyncio.to_thread(_positions_in, self.directory, segment)
            except archives.ArchiveDamaged as exc:
                logger.error("cannot finish removing the rows of %s: %s", segment.name, exc)
                continue
            logger.warning("finishing the removal of %s's rows (a purge stopped)", segment.name)
            await self._remove(segment, positions, new=False)

    async def _remove_leftovers(self) -> None:
        async with self._engine.connect() as connection:
            recorded = set((await connection.execute(select(archived_segments.c.name))).scalars())
        removed = await asyncio.to_thread(archives.remove_unrecorded, self.directory, recorded)
        if removed:
            logger.warning(
                "removed what an interrupted purge left in %s (its events are still in the "
                "log): %s",
                self.directory,
                ", ".join(removed),
            )


def _positions_in(directory: Path, segment: Segment) -> list[int]:
    return [event.position for event in archives.read_segment(directory, segment)]


class _Statements:
    """A segment's removals as guarded writes, compiled for the store's database."""

    def __init__(self, store: EventStore) -> None:
        dialect = store.engine.dialect
        self._guard, _ = compile_write(
            select(archived_segments.c.name)
            .where(archived_segments.c.name == bindparam("name"))
            .with_for_update(),
            {"name": ""},
            dialect,
        )
        self._delete, _ = compile_write(
            delete(events).where(events.c.position == bindparam("p")), {"p": 0}, dialect
        )
        self._done, _ = compile_write(
            update(archived_segments)
            .where(archived_segments.c.name == bindparam("segment"))
            .values(removed_at=bindparam("at")),
            {"segment": "", "at": ""},
            dialect,
        )
        self._dialect = dialect

    def removal(
        self, segment: Segment, positions: list[int], *, record: bool, done: str | None
    ) -> GuardedWrite:
        """Remove ``positions``; ``record`` the segment first (only if it is not recorded:
        the guard), or only if it is; mark it ``done`` (its rows all removed) at the end."""
        statements: list[tuple[str, list[list[Any]]]] = []
        if record:
            statements.append(
                compile_write(
                    archived_segments.insert(), archives.segment_row(segment), self._dialect
                )
            )
        if positions:
            statements.append((self._delete, [[position] for position in positions]))
        if done is not None:
            statements.append((self._done, [[done, segment.name]]))
        return GuardedWrite(
            self._guard,
            [segment.name],
            [] if record else [[segment.name]],
            statements,
            yields=True,
        )
