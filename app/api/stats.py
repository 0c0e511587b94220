"""``/stats``: the headline numbers, as one JSON body and as a live SSE feed of snapshots.

A snapshot is computed once for every reader in the process (single flight, cached by the log
position it reflects), so a thousand dashboards cost one read of the projections per change,
and each subscriber receives at most :data:`MIN_INTERVAL` apart the newest snapshot there is:
a burst of appends collapses into one frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import NamedTuple

import msgspec
from litestar import Controller, get
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide

from app.api.deps import ServicesDep
from app.api.events import LastEventIdHeader, LastEventIdQuery
from app.api.sse import EventStreamResponse, control_frame, parse_last_event_id
from app.events.envelope import utc_now
from app.projections.stats import SNAPSHOT_PROJECTIONS, Stats, read_stats
from app.runtime.services import Services

__all__ = ["MIN_INTERVAL", "StatsController", "StatsSnapshots", "stats_stream"]

#: At most four snapshots a second per subscriber.
MIN_INTERVAL = 0.25
#: How long a snapshot waits for the projections to reach the position it is taken for.
PROJECTION_WAIT = 2.0
#: ``GET /stats`` reuses a snapshot of the current head this young (stalled agents are the
#: only numbers that change with time alone, on a scale of heartbeat periods).
READ_MAX_AGE = 0.5

_encoder = msgspec.json.Encoder()


class Snapshot(NamedTuple):
    stats: Stats
    #: The SSE frame: ``id`` = the position the snapshot reflects, ``data`` = the body.
    frame: bytes
    body: bytes
    taken_at: float

    @property
    def position(self) -> int:
        return self.stats.position


class StatsSnapshots:
    """The newest snapshot of ``/stats``, shared by every reader of one process."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._lock = asyncio.Lock()
        self._snapshot: Snapshot | None = None

    def _fresh(self, target: int, max_age: float | None) -> Snapshot | None:
        snapshot = self._snapshot
        if snapshot is None or snapshot.position < target:
            return None
        if max_age is not None and asyncio.get_running_loop().time() - snapshot.taken_at > max_age:
            return None
        return snapshot

    async def latest(self, target: int, *, max_age: float | None = None) -> Snapshot:
        """A snapshot reflecting the log at least up to ``target`` (if the projections get
        there within :data:`PROJECTION_WAIT`), taken at most ``max_age`` seconds ago."""
        found = self._fresh(target, max_age)
        if found is not None:
            return found
        async with self._lock:
            found = self._fresh(target, max_age)
            if found is not None:
                return found
            services = self._services
            for name in SNAPSHOT_PROJECTIONS:
                await services.projections.wait_for(name, target, within=PROJECTION_WAIT)
            async with services.engine.connect() as connection:
                stats = await read_stats(
                    connection, heartbeat_seconds=services.settings.server.heartbeat_seconds
                )
            body = _encoder.encode(stats)
            frame = b"id: %d\nevent: stats\ndata: %s\n\n" % (stats.position, body)
            found = Snapshot(stats, frame, body, asyncio.get_running_loop().time())
            self._snapshot = found
            return found


def provide_stats(state: State) -> StatsSnapshots:
    # Made on first use: it holds no task or connection, so it needs no lifespan of its own.
    snapshots: StatsSnapshots | None = state.get("stats_snapshots")
    if snapshots is None:
        snapshots = StatsSnapshots(state.services)
        state.stats_snapshots = snapshots
    return snapshots


StatsDep = NamedDependency[StatsSnapshots]


async def stats_stream(
    services: Services,
    snapshots: StatsSnapshots,
    after: int | None,
    *,
    heartbeat_seconds: float,
    retry_ms: int,
    min_interval: float = MIN_INTERVAL,
) -> AsyncIterator[bytes]:
    """``retry``, optional ``reset``, the current snapshot, then a new one whenever the log
    moves (coalesced to ``min_interval``), with heartbeats while nothing happens."""
    yield b"retry: %d\n\n" % retry_ms
    store, feed = services.store, services.store.feed
    if after is not None:
        head = await store.head()
        if after > head:
            yield control_frame("reset", {"head": head})
    loop = asyncio.get_running_loop()
    sent = await snapshots.latest(feed.head)
    yield sent.frame
    sent_at = last_write = loop.time()
    # The log position the newest computation was asked for: a change is a head beyond it.
    covered = sent.position
    while True:
        changed = feed.changed()
        if feed.head <= covered:
            idle = heartbeat_seconds - (loop.time() - last_write)
            if idle > 0:
                await asyncio.wait((changed,), timeout=idle)
            if feed.head <= covered:
                # Quiet log: numbers that depend on time alone (stalled agents) may still move.
                snapshot = await snapshots.latest(covered, max_age=heartbeat_seconds)
                if snapshot.body != sent.body:
                    sent, sent_at = snapshot, loop.time()
                    yield sent.frame
                yield control_frame("heartbeat", {"timestamp": utc_now(), "head": feed.head})
                last_write = loop.time()
                continue
        pause = sent_at + min_interval - loop.time()
        if pause > 0:
            await asyncio.sleep(pause)
        target = feed.head
        snapshot = await snapshots.latest(target)
        # A projection that did not catch up in time is asked again at the next turn.
        covered = min(target, snapshot.position)
        if snapshot.body != sent.body:
            sent, sent_at = snapshot, loop.time()
            last_write = sent_at
            yield sent.frame


class StatsController(Controller):
    path = "/stats"
    tags = ["log"]
    dependencies = {"stats": Provide(provide_stats, sync_to_thread=False)}

    @get("/", summary="Headline numbers: running work, totals, recent results")
    async def get_stats(self, services: ServicesDep, stats: StatsDep) -> Stats:
        # Read-your-writes: a snapshot reflecting at least the head at the request's arrival.
        head = await services.store.head()
        return (await stats.latest(head, max_age=READ_MAX_AGE)).stats

    @get("/stream", summary="Follow the headline numbers over SSE (a snapshot per change)")
    async def stream_stats(
        self,
        services: ServicesDep,
        stats: StatsDep,
        last_event_id_header: LastEventIdHeader = None,
        last_event_id: LastEventIdQuery = None,
    ) -> EventStreamResponse:
        after = parse_last_event_id(last_event_id_header, last_event_id)
        settings = services.settings.server
        return EventStreamResponse(
            stats_stream(
                services,
                stats,
                after,
                heartbeat_seconds=settings.heartbeat_seconds,
                retry_ms=settings.retry_ms,
            ),
            write_timeout=settings.write_timeout_seconds,
        )
