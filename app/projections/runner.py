"""Folds the log into the projections' tables, each event exactly once.

Every step reads the events after a projection's checkpoint and applies them in one
transaction that also moves the checkpoint, so a crash at any point leaves the rows and the
checkpoint in agreement. The checkpoint rows are locked for the step's writes (``FOR UPDATE``,
or the database's one write lock), so two processes never apply the same events.

Reads after an append see it by waiting for the checkpoint: an API read first takes the log's
head, then waits (briefly) until the projection has caught up to it.

The runner folds every projection that is behind in one transaction, and takes its next
step no sooner than ``coalesce_seconds`` after the previous one: under a stream of appends it
folds many commits per step (one write lock and one fsync for all of them) instead of taking
the database's write lock after every commit, which would stall the appenders. A reader
waiting for a position (:meth:`ProjectionRunner.wait_for`) cuts that pause short. A step's
writes are made by the log's appender, guarded by the checkpoints the step read
(:mod:`app.projections.deferred`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from sqlalchemy import bindparam, delete, literal, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.backends import GuardedWrite, upsert, write_transaction
from app.eventlog import EventFilter, EventStore
from app.eventlog.archives import history
from app.eventlog.store import Page, read_head, read_page, rows_within
from app.events.envelope import utc_now
from app.projections.base import Projection, checkpoints
from app.projections.deferred import DeferredWrites, compile_write
from app.projections.snapshots import newest_snapshot, restore_snapshot
from app.runtime.background import Background

__all__ = ["ProjectionRunner", "UnknownProjection"]

#: A table read's rows are sized from the previous read's events to hold about
#: ``page_bytes``; before any read, events are taken to be this large (a first read of large
#: events stays within the bound, one of small events is just shorter).
_FIRST_GUESS_BYTES = 16 * 1024

logger = logging.getLogger(__name__)


class UnknownProjection(KeyError):
    pass


async def _read_checkpoints(
    connection: AsyncConnection, projections: Sequence[Projection], *, for_update: bool = False
) -> dict[str, int]:
    query = (
        select(checkpoints.c.name, checkpoints.c.position)
        .where(checkpoints.c.name.in_([projection.name for projection in projections]))
        .order_by(checkpoints.c.name)
    )
    if for_update:
        query = query.with_for_update()
    rows = (await connection.execute(query)).all()
    return {name: int(position) for name, position in rows}


async def _move_checkpoints(connection: AsyncConnection, moved: dict[str, int]) -> None:
    """Set each named projection's checkpoint to its new position (one statement)."""
    if moved:
        await connection.execute(
            update(checkpoints)
            .where(checkpoints.c.name == bindparam("checkpoint"))
            .values(position=bindparam("to"), updated_at=utc_now()),
            [{"checkpoint": name, "to": to} for name, to in moved.items()],
        )


async def _apply_page(
    connection: AsyncConnection, projection: Projection, position: int, page: Page
) -> tuple[int, bool]:
    """Apply ``page`` (read after ``position``): the position the checkpoint moves to (the
    same when the page holds nothing new) and whether more events follow it."""
    if page.scanned_to <= position:
        return position, False
    if page.events:
        await projection.apply(connection, page.events)
    return page.scanned_to, page.scanned_to < page.head


async def _apply_pages(
    connection: AsyncConnection,
    projections: Sequence[Projection],
    positions: dict[str, int],
    pages: dict[str, Page],
) -> tuple[list[tuple[Projection, int, bool]], dict[str, int]]:
    """Apply each projection's page, read after its position: for each, the position it
    reaches and whether more events follow; and the positions that moved."""
    stepped: list[tuple[Projection, int, bool]] = []
    moved: dict[str, int] = {}
    for projection in projections:
        position = positions[projection.name]
        to, more = await _apply_page(connection, projection, position, pages[projection.name])
        if to != position:
            moved[projection.name] = to
        stepped.append((projection, to, more))
    return stepped, moved


class ProjectionRunner:
    def __init__(
        self,
        engine: AsyncEngine,
        projections: Sequence[Projection],
        *,
        store: EventStore | None = None,
        batch_size: int = 1000,
        page_bytes: int = 8 * 1024 * 1024,
        poll_seconds: float = 1.0,
        coalesce_seconds: float = 0.1,
    ) -> None:
        self._engine = engine
        # A runner that fell behind the feed reads the table: up to ``batch_size`` events a
        # projection (times the projections sharing the read), and no more than about
        # ``page_bytes`` of them, or a page of large events would hold hundreds of MB.
        self._page_bytes = page_bytes
        self._page_rows = max(1, page_bytes // _FIRST_GUESS_BYTES)
        self._coalesce_seconds = coalesce_seconds
        #: Set by a reader waiting for the projections: take the next step now.
        self._hurry = asyncio.Event()
        self._store = store
        self._batch_size = batch_size
        self._poll_seconds = poll_seconds
        self.projections = {projection.name: projection for projection in projections}
        self._positions: dict[str, int] = {}
        self._advanced: asyncio.Future[None] | None = None
        self._task = Background("projection-runner")
        self._checkpoints_ready = False

    def get(self, name: str) -> Projection:
        try:
            return self.projections[name]
        except KeyError:
            known = ", ".join(sorted(self.projections))
            raise UnknownProjection(f"no projection named {name!r} (known: {known})") from None

    async def start(self) -> None:
        await self._ensure_checkpoints()
        self._task.start(self._run())

    async def close(self) -> None:
        await self._task.stop()

    async def _ensure_checkpoints(self) -> None:
        async with self._engine.connect() as connection:
            connection = await write_transaction(connection)
            async with connection.begin():
                await upsert(
                    connection,
                    checkpoints,
                    [
                        {"name": name, "position": 0, "updated_at": utc_now()}
                        for name in self.projections
                    ],
                    key=("name",),
                    update=False,
                )
        self._checkpoints_ready = True

    async def _run(self) -> None:
        assert self._store is not None, "a running projector follows a store's feed"
        feed = self._store.feed
        loop = asyncio.get_running_loop()
        last_step = -float("inf")
        while True:
            changed = feed.changed()
            try:
                # Known to be caught up: skip the step (and its lock).
                behind = [
                    name for name in self.projections if self._positions.get(name, -1) < feed.head
                ]
                if behind:
                    pause = last_step + self._coalesce_seconds - loop.time()
                    if pause > 0 and not self._hurry.is_set():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._hurry.wait(), pause)
                    self._hurry.clear()
                    await self._catch_up_together(behind, until=feed.head)
                    last_step = loop.time()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("projection step failed; retrying")
                await asyncio.sleep(self._poll_seconds)
                continue
            await asyncio.wait((changed,), timeout=self._poll_seconds)

    async def catch_up(self, name: str, *, until: int | None = None) -> int:
        """Apply everything after the checkpoint (up to ``until`` if given, else the head)."""
        return (await self._catch_up_together([name], until=until))[name]

    async def _catch_up_together(
        self, names: list[str], *, until: int | None = None
    ) -> dict[str, int]:
        """Fold the named projections up to ``until`` (or the head), one transaction per
        round for all of them; returns each one's checkpoint.

        Each round reads the projections' next pages of events, and their checkpoints, before
        it writes: committed events never change, so only the projections' own writes need
        a lock. A runner with a store folds the round on that same read (at those
        checkpoints) and hands its writes to the log's appender, which makes them only if
        the checkpoints have not moved (:meth:`_step_deferred`): where appends and other
        writers share one write lock, between two appends, so appends never wait on the
        event loop for a step. Without a store, and when another process moved a checkpoint
        in between, the round is taken under the lock (:meth:`_step_locked`): there a
        checkpoint that moved since the page was read sends that projection back to reading
        its page. Checkpoints are locked in the same order (by name) in every process.
        """
        if not self._checkpoints_ready:  # a runner used without start() has made no rows yet
            await self._ensure_checkpoints()
        pending = [self.get(name) for name in names]
        reached: dict[str, int] = {}
        while pending:
            stepped: list[tuple[Projection, int, bool]] | None = None
            async with self._engine.connect() as connection:
                seen = await _read_checkpoints(connection, pending)
                pages = await self._read_pages(connection, pending, seen)
                if self._store is not None:
                    stepped = await self._step_deferred(connection, pending, seen, pages)
            if stepped is None:
                stepped = await self._step_locked(pending, seen, pages)
            pending = []
            for projection, position, more in stepped:
                self._note(projection.name, position)
                reached[projection.name] = position
                if more and (until is None or position < until):
                    pending.append(projection)
        return reached

    async def _step_deferred(
        self,
        connection: AsyncConnection,
        projections: list[Projection],
        seen: dict[str, int],
        pages: dict[str, Page],
    ) -> list[tuple[Projection, int, bool]] | None:
        """One step folded on ``connection`` (reading at the checkpoints ``seen``), its writes
        made by the log's appender between two of its transactions, guarded by those
        checkpoints (see :mod:`app.projections.deferred`); None if another process moved one
        of them meanwhile, and nothing was written."""
        assert self._store is not None
        deferred = DeferredWrites(connection)
        # It stands in for a connection in what a step calls: see DeferredWrites.
        writes = cast(AsyncConnection, deferred)
        stepped, moved = await _apply_pages(writes, projections, seen, pages)
        if not moved:
            return stepped
        await _move_checkpoints(writes, moved)
        names = sorted(seen)
        # The checkpoints as the step read them, locked till the write commits where the
        # database locks rows; each name a parameter of its own (a kept statement cannot
        # expand a list when it runs).
        guard = (
            select(checkpoints.c.name, checkpoints.c.position)
            .where(checkpoints.c.name.in_([literal(name) for name in names]))
            .order_by(checkpoints.c.name)
            .with_for_update()
        )
        guard_sql, (guard_parameters,) = compile_write(guard, None, connection.dialect)
        guarded = GuardedWrite(
            guard_sql,
            guard_parameters,
            [[name, seen[name]] for name in names],
            deferred.statements,
        )
        return stepped if await self._store.write_guarded(guarded) else None

    async def _step_locked(
        self, projections: list[Projection], seen: dict[str, int], pages: dict[str, Page]
    ) -> list[tuple[Projection, int, bool]]:
        """One step in a write transaction of its own, the checkpoints locked: a page read
        at a checkpoint another process has moved since is read again under the lock. It
        runs in the store's write turn (:meth:`EventStore.write_turn`)."""
        # The connection first: a wait for one (a busy pool) must not hold the appends.
        async with self._engine.connect() as connection, self._write_turn():
            connection = await write_transaction(connection)
            async with connection.begin():
                locked = await _read_checkpoints(connection, projections, for_update=True)
                pages = dict(pages)
                for projection in projections:
                    position = locked[projection.name]
                    if position != seen[projection.name]:
                        pages[projection.name] = await self._read(
                            connection, position, projection.source_filter, self._batch_size
                        )
                stepped, moved = await _apply_pages(connection, projections, locked, pages)
                await _move_checkpoints(connection, moved)
        return stepped

    def _write_turn(self) -> contextlib.AbstractAsyncContextManager[None]:
        """The store's appends wait while a step writes (see ``EventStore.write_turn``)."""
        if self._store is None:
            return contextlib.nullcontext()
        return self._store.write_turn()

    async def _read_pages(
        self, connection: AsyncConnection, projections: list[Projection], seen: dict[str, int]
    ) -> dict[str, Page]:
        """Each projection's next page: from the store's feed while it holds the events
        (:meth:`_recent`), else from the table. Projections at the same checkpoint (all of
        them, once caught up) share one read of every event, as many as their own pages
        would hold together, and each takes the events it folds: one read and one step for
        several pages' worth, where reading each projection's page apart read most events
        twice."""
        by_position: dict[int, list[Projection]] = {}
        for projection in projections:
            by_position.setdefault(seen[projection.name], []).append(projection)
        pages: dict[str, Page] = {}
        for position, together in by_position.items():
            shared = self._recent(position)
            if shared is None and len(together) == 1:
                (projection,) = together
                pages[projection.name] = await self._read(
                    connection, position, projection.source_filter, self._batch_size
                )
                continue
            if shared is None:
                shared = await self._read(
                    connection, position, EventFilter(), self._batch_size * len(together)
                )
            for projection in together:
                wanted = projection.source_filter
                found = (
                    shared.events
                    if wanted.is_empty
                    else [event for event in shared.events if wanted.matches(event)]
                )
                pages[projection.name] = Page(found, shared.scanned_to, shared.head)
        return pages

    async def _read(
        self, connection: AsyncConnection, after: int, event_filter: EventFilter, rows: int
    ) -> Page:
        """Up to ``rows`` events from the table, fewer if they are large (``page_bytes``)."""
        page = await read_page(connection, after, event_filter, min(rows, self._page_rows))
        if page.events:
            self._page_rows = rows_within(self._page_bytes, page)
        return page

    def _recent(self, position: int) -> Page | None:
        """The events after ``position`` from the store's feed, which holds the newest
        committed events in memory (its capacity bounds the page), or None when it no longer
        holds them all and the table is read. A runner that keeps up takes every page from
        there: no query, no rows to turn into events again, and as many events a step as
        have arrived since the last (fewer steps, each a turn of the write lock)."""
        if self._store is None:
            return None
        feed = self._store.feed
        entries = feed.entries_after(position)
        if entries is None:
            return None
        return Page([entry.event for entry in entries], feed.head, feed.head)

    def _note(self, name: str, position: int) -> None:
        if position > self._positions.get(name, -1):
            self._positions[name] = position
            if self._advanced is not None and not self._advanced.done():
                self._advanced.set_result(None)

    async def checkpoint(self, name: str) -> int:
        async with self._engine.connect() as connection:
            result = await connection.execute(
                select(checkpoints.c.position).where(checkpoints.c.name == name)
            )
            position = int(result.scalar_one_or_none() or 0)
        self._note(name, position)
        return position

    async def wait_for(self, name: str, position: int, *, within: float = 5.0) -> bool:
        """Wait (at most ``within`` seconds) until projection ``name`` reflects the log up to
        ``position``; False if it did not get there in time."""
        self.get(name)
        if self._positions.get(name, -1) >= position:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            # Another process may be the one projecting: the table is the truth.
            if await self.checkpoint(name) >= position:
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            if self._advanced is None or self._advanced.done():
                self._advanced = loop.create_future()
            self._hurry.set()
            await asyncio.wait((self._advanced,), timeout=min(remaining, 0.05))

    async def rebuild(self, name: str, **options: Any) -> int:
        """Rebuild one projection (see :meth:`rebuild_together`)."""
        return (await self.rebuild_together([name], **options))[name]

    async def rebuild_together(
        self,
        names: Sequence[str],
        *,
        archive_dir: Path | None = None,
        from_snapshots: bool = True,
    ) -> dict[str, int]:
        """Rebuild the named projections in one transaction, sharing each read of the log;
        readers see the old rows until the new ones are complete. Returns each one's
        checkpoint.

        Each starts from its newest snapshot (``from_snapshots``), or from nothing, and folds
        every event after it: from the table, and from the archive segments under
        ``archive_dir`` where retention removed events from the table
        (:func:`app.eventlog.archives.history`). Raises ArchiveDamaged, nothing changed, if a
        segment it needs is missing or damaged.
        """
        chosen = [self.get(name) for name in sorted(set(names))]
        directory = Path(archive_dir) if archive_dir is not None else Path(".")
        await self._ensure_checkpoints()
        async with self._engine.connect() as connection:
            connection = await write_transaction(connection)
            async with connection.begin():
                # Locked in name order, as every step locks them.
                await _read_checkpoints(connection, chosen, for_update=True)
                head = await read_head(connection)
                positions: dict[str, int] = {}
                for projection in chosen:
                    for table in projection.tables:
                        await connection.execute(delete(table))
                    snapshot = (
                        await newest_snapshot(connection, projection.name, through=head)
                        if from_snapshots
                        else None
                    )
                    if snapshot is not None:
                        await restore_snapshot(connection, projection, snapshot)
                    positions[projection.name] = 0 if snapshot is None else snapshot.position
                by_position: dict[int, list[Projection]] = {}
                for projection in chosen:
                    by_position.setdefault(positions[projection.name], []).append(projection)
                for position, together in sorted(by_position.items()):
                    # Shared pages as large as the projections' pages together, within the
                    # byte bound.
                    rows = min(self._batch_size * len(together), self._page_rows)
                    async for found in history(
                        connection, directory, position, EventFilter(), through=head, page=rows
                    ):
                        for projection in together:
                            wanted = projection.source_filter
                            mine = (
                                found
                                if wanted.is_empty
                                else [event for event in found if wanted.matches(event)]
                            )
                            if mine:
                                await projection.apply(connection, mine)
                positions = {name: max(head, at) for name, at in positions.items()}
                await _move_checkpoints(connection, positions)
        self._positions.update(positions)
        return positions
