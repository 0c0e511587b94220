"""replay_then_tail: replay from a position, then follow the log live."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Any, cast

import pytest

from app.api.sse import FrameBuilder, envelope_frame, payload_frame, sql_frames
from app.backends import backend_for
from app.config import DatabaseSettings
from app.eventlog import (
    Event,
    EventFilter,
    EventStore,
    LogEntry,
    NewEvent,
    canonical_payload,
    replay_then_tail,
)
from app.eventlog.store import FramePage
from tests.support import make_settings, open_store

# The fallback poll the test settings use (TAIL_POLL_SECONDS).
POLL_SECONDS = make_settings("sqlite+aiosqlite:///unused.db").server.poll_seconds
DEADLINE = 30.0


def new(
    source_id: str = "a1",
    event: str = "progress",
    *,
    stream: str = "agents",
    agent_name: str = "tagger",
    **payload: Any,
) -> NewEvent:
    return NewEvent(
        stream=stream,
        source_id=source_id,
        event=event,
        payload=canonical_payload({"agent_name": agent_name, **payload}),
    )


def tail_of(
    store: EventStore,
    after: int = 0,
    event_filter: EventFilter | None = None,
    *,
    idle_timeout: float | None = 0.5,
    chunk: int = 1000,
) -> AsyncGenerator[list[LogEntry], None]:
    """replay_then_tail, typed as the async generator it is (so it can be closed)."""
    return cast(
        AsyncGenerator[list[LogEntry], None],
        replay_then_tail(store, after, event_filter, idle_timeout=idle_timeout, chunk=chunk),
    )


async def eventually(condition: Callable[[], bool], what: str) -> None:
    for _ in range(int(DEADLINE / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what} within {DEADLINE} s")


class Tail:
    """A replay_then_tail consumer running as a task, recording what it receives."""

    def __init__(
        self,
        store: EventStore,
        after: int = 0,
        event_filter: EventFilter | None = None,
        *,
        until: Callable[[list[LogEntry]], bool],
    ) -> None:
        self.received: list[LogEntry] = []
        self.progress = asyncio.Event()
        self._until = until
        self._task = asyncio.create_task(self._run(store, after, event_filter))

    async def _run(self, store: EventStore, after: int, event_filter: EventFilter | None) -> None:
        async with contextlib.aclosing(tail_of(store, after, event_filter)) as entries_lists:
            async for entries in entries_lists:
                self.received.extend(entries)
                self.progress.set()
                if self._until(self.received):
                    return

    @property
    def positions(self) -> list[int]:
        return [entry.position for entry in self.received]

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(DEADLINE):
            while len(self.received) < count:
                self.progress.clear()
                if self._task.done():
                    self._task.result()
                    break
                await self.progress.wait()

    async def finished(self) -> list[int]:
        async with asyncio.timeout(DEADLINE):
            await self._task
        return self.positions

    async def cancel(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def reaching(position: int) -> Callable[[list[LogEntry]], bool]:
    return lambda received: bool(received) and received[-1].position >= position


async def test_replays_then_follows_live_appends(store: EventStore) -> None:
    await store.append([new(n=n) for n in range(5)])
    tail = Tail(store, 0, until=reaching(12))

    await tail.wait_for(5)
    assert tail.positions == [1, 2, 3, 4, 5]
    for n in range(5, 12):
        await store.append_one(new(n=n))

    assert await tail.finished() == list(range(1, 13))
    assert [e.event.payload_dict()["n"] for e in tail.received] == list(range(12))
    assert [e.event for e in tail.received] == (await store.read_after(0)).events


async def test_replay_starts_after_the_given_position(store: EventStore) -> None:
    await store.append([new(n=n) for n in range(8)])
    tail = Tail(store, 6, until=reaching(9))
    await store.append_one(new(n=8))

    assert await tail.finished() == [7, 8, 9]


async def test_a_tail_from_the_head_gets_only_new_events(store: EventStore) -> None:
    await store.append([new(n=n) for n in range(3)])
    tail = Tail(store, await store.head(), until=reaching(4))
    await store.append_one(new(n=3))

    assert await tail.finished() == [4]


FILTERS = {
    "stream": EventFilter(streams=("jobs",)),
    "source": EventFilter(source_ids=("a2", "j1")),
    "agent": EventFilter(agent_names=("writer",)),
    "event": EventFilter(events=("finished",)),
    "all": EventFilter(
        streams=("agents",), source_ids=("a1",), events=("progress",), agent_names=("tagger",)
    ),
}


def wanted(event_filter: EventFilter, event: Event) -> bool:
    """The filter's meaning, spelled out independently of the code under test."""
    return (
        (not event_filter.streams or event.stream in event_filter.streams)
        and (not event_filter.source_ids or event.source_id in event_filter.source_ids)
        and (not event_filter.events or event.event in event_filter.events)
        and (
            not event_filter.agent_names
            or event.payload_dict()["agent_name"] in event_filter.agent_names
        )
    )


def mixed(n: int) -> NewEvent:
    return new(
        ["a1", "a2", "a3", "j1"][n % 4],
        ["progress", "started", "progress", "finished", "progress"][n % 5],
        stream="jobs" if n % 4 == 3 else "agents",
        agent_name=["tagger", "writer", "scout"][n % 3],
        n=n,
    )


def sentinel_for(name: str) -> NewEvent:
    """The last event a filtered tail waits for: it matches ``FILTERS[name]``."""
    event_filter = FILTERS[name]
    return NewEvent(
        stream=(event_filter.streams or ("agents",))[0],
        source_id=(event_filter.source_ids or ("a1",))[0],
        event=(event_filter.events or ("progress",))[0],
        payload=canonical_payload(
            {"agent_name": (event_filter.agent_names or ("tagger",))[0], "sentinel": name}
        ),
    )


def seen_sentinel(name: str) -> Callable[[list[LogEntry]], bool]:
    return lambda received: any(e.payload().get("sentinel") == name for e in received)


async def test_filtered_tails_get_exactly_the_matching_events(store: EventStore) -> None:
    history = [mixed(n) for n in range(90)]
    await store.append(history[:30])
    replayed = (await store.read_after(0)).events
    tails = {
        name: Tail(store, 0, event_filter, until=seen_sentinel(name))
        for name, event_filter in FILTERS.items()
    }
    # Every tail has replayed the history before the live appends start.
    for name, tail in tails.items():
        await tail.wait_for(len([e for e in replayed if wanted(FILTERS[name], e)]))

    await asyncio.gather(*(store.append_one(event) for event in history[30:60]))
    await store.append(history[60:])
    # Once a tail has its sentinel, it has been offered everything appended before it.
    await store.append([sentinel_for(name) for name in FILTERS])

    stored = (await store.read_after(0)).events
    for name, tail in tails.items():
        await tail.finished()
        expected = [e for e in stored if wanted(FILTERS[name], e)]
        assert [entry.event for entry in tail.received] == expected, name
        assert len(expected) >= 5, name


async def append_mixed(store: EventStore, writer: int, count: int) -> None:
    """``count`` events as single appends and small batches, over a few sources."""
    sent = 0
    while sent < count:
        size = min([1, 3, 1, 5, 2][(writer + sent) % 5], count - sent)
        batch = [new(f"w{writer}-{(sent + i) % 3}", n=sent + i) for i in range(size)]
        if size == 1:
            await store.append_one(batch[0])
        else:
            await store.append(batch)
        sent += size


async def test_a_tail_behind_the_feed_window_misses_nothing_and_blocks_no_one(
    log_settings: DatabaseSettings,
) -> None:
    async with open_store(log_settings, feed_capacity=50) as store:
        await store.append_one(new(n=0))
        # Small table reads, so that catching up takes many full pages.
        slow = tail_of(store, 0, chunk=64)
        try:
            assert [entry.position for entry in await anext(slow)] == [1]
            fast = Tail(store, 0, until=reaching(501))

            # The slow tailer takes nothing while 500 events are written: no writer waits for it.
            async with asyncio.timeout(DEADLINE):
                await asyncio.gather(*(append_mixed(store, w, 100) for w in range(5)))
            assert await store.head() == 501
            assert store.feed.entries_after(1) is None, "the slow tailer should be out of the ring"
            # Nor does any other subscriber wait for it.
            assert await fast.finished() == list(range(1, 502))

            # An idle tick means the tailer believes it has caught up with the head.
            received = [1]
            async with asyncio.timeout(DEADLINE):
                while entries := await anext(slow):
                    received.extend(entry.position for entry in entries)
            assert received == list(range(1, 502))
        finally:
            await slow.aclose()
        assert store.feed.subscribers == 0


async def test_an_idle_tail_yields_empty_lists(store: EventStore) -> None:
    async with contextlib.aclosing(tail_of(store, 0, idle_timeout=0.05)) as tail:
        async with asyncio.timeout(DEADLINE):
            assert await anext(tail) == []
            assert await anext(tail) == []
            await store.append_one(new())
            assert [entry.position for entry in await anext(tail)] == [1]
            assert await anext(tail) == []


async def test_closing_or_cancelling_a_tail_releases_its_subscription(store: EventStore) -> None:
    await store.append_one(new())
    assert store.feed.subscribers == 0
    tails = [tail_of(store, 0) for _ in range(3)]
    for tail in tails:
        assert [entry.position for entry in await anext(tail)] == [1]
    assert store.feed.subscribers == 3

    for tail in tails:
        await tail.aclose()
    assert store.feed.subscribers == 0

    # A consumer waiting for the next event and cancelled, as a disconnecting client's task is.
    waiting = Tail(store, 1, until=reaching(10**9))
    await eventually(lambda: store.feed.subscribers == 1, "the tail did not subscribe")
    await waiting.cancel()
    assert store.feed.subscribers == 0


async def test_appends_by_another_store_reach_a_tail(log_settings: DatabaseSettings) -> None:
    # Where the backend notifies other processes of appends, the tailing store never polls
    # within the test: only a notification can wake it. Elsewhere the fallback poll of the
    # test settings does.
    backend = backend_for(log_settings.url)
    notified = backend.listener(lambda _: None, backend.appender(log_settings)) is not None
    poll = 3600.0 if notified else POLL_SECONDS
    async with (
        open_store(log_settings, poll_seconds=poll) as tailing,
        open_store(log_settings) as writing,
    ):
        if notified:
            listener: Any = tailing._listener
            async with asyncio.timeout(DEADLINE):
                await listener.connected.wait()
        await tailing.append_one(new("own", n=0))
        tail = Tail(tailing, 0, until=reaching(41))
        await tail.wait_for(1)

        for n in range(1, 11):
            await writing.append_one(new("other", n=n))
        await writing.append([new("other", n=n) for n in range(11, 21)])
        await tail.wait_for(21)
        assert tail.positions == list(range(1, 22))

        # Own appends right behind another store's, before any wake-up for those arrived: the
        # own batch does not follow the feed's head, and the rows in between must not be lost.
        for round_ in range(5):
            start = 21 + 4 * round_
            await writing.append([new("other", n=start + n) for n in range(3)])
            await tailing.append_one(new("own", n=start + 3))
        assert await tail.finished() == list(range(1, 42))
        assert [e.event.payload_dict()["n"] for e in tail.received] == list(range(41))


# Source ids of every kind the log takes: quotes, a backslash, accents, C1 controls, line and
# paragraph separators, characters beyond the BMP.
ODD_SOURCES = ['odd "source" \\ é', "\x85\x9f", "sep\u2028\u2029", "😀 \U0010ffff", "a1"]


def odd(n: int) -> NewEvent:
    return new(
        ODD_SOURCES[n % len(ODD_SOURCES)],
        ["progress", "started", "finished"][n % 3],
        stream=["agents", "jobs"][n % 2],
        agent_name=["tagger", "writer"][n % 2],
        message=f'line {n}\nwith "quotes", \\, \t, \x00 and é 😀',
        nested={"list": [n, 1.5, None, True], "empty": {}},
    )


@pytest.mark.parametrize("build", [envelope_frame, payload_frame])
@pytest.mark.parametrize(
    "event_filter",
    [
        EventFilter(),
        EventFilter(streams=("jobs",)),
        EventFilter(source_ids=(ODD_SOURCES[0], ODD_SOURCES[3])),
        EventFilter(events=("started", "finished")),
        # Checked on the rows: the pages come as entries on every database.
        EventFilter(agent_names=("writer",)),
    ],
    ids=["all", "stream", "sources", "events", "agent-name"],
)
async def test_pages_framed_by_the_database_hold_the_bytes_entries_frame_to(
    log_settings: DatabaseSettings, event_filter: EventFilter, build: FrameBuilder
) -> None:
    """A tail given a frame expression gets the pages it reads from the table as frames
    built by the database (for filters the query applies whole), byte for byte the frames
    entries make; otherwise as entries."""
    async with open_store(log_settings, feed_capacity=20) as store:
        await store.append([odd(n) for n in range(300)])
        expected = b"".join(
            build(LogEntry(event))
            for event in (await store.read_after(0, limit=1000)).events
            if wanted(event_filter, event)
        )
        got = b""
        framed_pages = 0
        tail = replay_then_tail(
            store,
            0,
            event_filter,
            idle_timeout=0.5,
            chunk=64,
            frame=sql_frames(store.backend)[build],
        )
        async with contextlib.aclosing(cast(AsyncGenerator[Any, None], tail)) as entries_lists:
            async with asyncio.timeout(DEADLINE):
                async for entries in entries_lists:
                    if not entries:
                        break  # caught up: an idle tick
                    if isinstance(entries, FramePage):
                        framed_pages += 1
                        assert entries.frame_count == entries.frames.count(b"\n\nid: ") + 1
                        got += entries.frames
                    else:
                        got += b"".join(build(entry) for entry in entries)
        assert got == expected
        # The replay read pages of at most 64 rows from the table (the feed holds the last 20).
        if not event_filter.rechecked:
            assert framed_pages >= len(expected.split(b"\n\n")) // 64
        else:
            assert framed_pages == 0
