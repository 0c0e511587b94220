"""The race: many concurrent writers while tailers follow from position 0.

Every tailer must receive every event exactly once, in strictly increasing position order,
and what it received must equal the table's final contents. A tailer that read ``position >
last`` past a row committing late would skip it forever; these tests would catch that.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import sys
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import cast

import pytest

from app.config import DatabaseSettings
from app.eventlog import (
    Event,
    EventStore,
    LogEntry,
    NewEvent,
    canonical_payload,
    replay_then_tail,
)
from tests.support import ROOT, open_store, verified_chain

WRITERS = 8
EVENTS_PER_WRITER = 500
TAILERS = 4
# Bounds, not expectations: a test that gets here has failed, it does not hang.
DEADLINE = 120.0
POLL_SECONDS = 0.2
SOURCES = [f"s{n}" for n in range(6)]

Pair = tuple[int, str]


async def write_events(store: EventStore, writer: int, count: int) -> list[Pair]:
    """``count`` events as single appends and small batches over shared sources."""
    rng = random.Random(writer)
    written: list[Pair] = []
    sent = 0
    while sent < count:
        size = min(rng.choice([1, 1, 1, 2, 3, 5, 8]), count - sent)
        batch = [
            NewEvent(
                stream="agents",
                source_id=rng.choice(SOURCES),
                event="progress",
                payload=canonical_payload({"agent_name": f"w{writer}", "n": sent + i}),
            )
            for i in range(size)
        ]
        if size == 1:
            results = [await store.append_one(batch[0])]
        else:
            results = await store.append(batch)
        written.extend((r.position, r.event_id) for r in results)
        sent += size
    return written


async def follow(store: EventStore, final_head: asyncio.Future[int]) -> list[Pair]:
    """Tail from 0 until the final head (known once every writer is done) is reached."""
    received: list[Pair] = []
    tail = cast(AsyncGenerator[list[LogEntry], None], replay_then_tail(store, 0, idle_timeout=0.2))
    async with contextlib.aclosing(tail):
        async for entries in tail:
            received.extend((entry.position, entry.event.event_id) for entry in entries)
            if not final_head.done():
                continue
            if received and received[-1][0] >= final_head.result():
                break
            if not entries and store.feed.head >= final_head.result():
                # Idle although its store has seen the final head: the tailer believes it is
                # caught up, yet it is short of the head. Stop; the caller's checks say why.
                break
    return received


async def read_table(store: EventStore) -> list[Event]:
    found: list[Event] = []
    after = 0
    for _ in range(1000):
        page = await store.read_after(after, limit=700)
        found.extend(page.events)
        if page.scanned_to >= page.head:
            return found
        after = page.scanned_to
    raise AssertionError("read_after paging did not reach the head")


def compare(received: list[Pair], contents: list[Pair]) -> str:
    """Where a tailer's sequence first departs from the table, in a line."""
    for index, (got, expected) in enumerate(zip(received, contents, strict=False)):
        if got != expected:
            return f"at index {index} it got {got}, the table has {expected}"
    return f"it got {len(received)} events, the table has {len(contents)}"


async def race(
    writers: Sequence[Callable[[], Awaitable[list[Pair]]]], tail_stores: Sequence[EventStore]
) -> None:
    """Start the tailers, run the writers together, then check what everyone saw."""
    final_head: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    tailers = [
        asyncio.create_task(follow(tail_stores[n % len(tail_stores)], final_head))
        for n in range(TAILERS)
    ]
    try:
        async with asyncio.timeout(DEADLINE):
            written = await asyncio.gather(*(writer() for writer in writers))
        head = await tail_stores[0].head()
        final_head.set_result(head)
        async with asyncio.timeout(DEADLINE):
            received = await asyncio.gather(*tailers)
    finally:
        for tailer in tailers:
            tailer.cancel()
        await asyncio.gather(*tailers, return_exceptions=True)

    total = WRITERS * EVENTS_PER_WRITER
    table = await read_table(tail_stores[0])
    contents = [(event.position, event.event_id) for event in table]
    assert head == total
    assert [position for position, _ in contents] == list(range(1, total + 1))
    assert sorted(pair for part in written for pair in part) == contents
    for n, sequence in enumerate(received):
        positions = [position for position, _ in sequence]
        assert all(a < b for a, b in itertools.pairwise(positions)), (
            f"tailer {n} received positions out of order or twice"
        )
        if sequence != contents:
            pytest.fail(
                f"tailer {n} did not receive the table's contents: {compare(sequence, contents)}"
            )
    versions: dict[tuple[str, str], list[int]] = defaultdict(list)
    for event in table:
        versions[(event.stream, event.source_id)].append(event.version)
    for key, seen in versions.items():
        assert seen == list(range(1, len(seen) + 1)), f"versions of {key} are not gapless"


async def test_writers_and_tailers_on_one_store(store: EventStore) -> None:
    await race(
        [partial(write_events, store, writer, EVENTS_PER_WRITER) for writer in range(WRITERS)],
        [store],
    )


CHILD = """
import asyncio, json, sys
from tests.eventlog.test_race import POLL_SECONDS, write_events
from tests.support import open_store

async def main(url: str, writers: list[int], count: int) -> None:
    async with open_store(url, poll_seconds=POLL_SECONDS) as store:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        written = await asyncio.gather(*(write_events(store, w, count) for w in writers))
    print(json.dumps([pair for part in written for pair in part]), flush=True)

asyncio.run(main(sys.argv[1], [int(w) for w in sys.argv[2].split(",")], int(sys.argv[3])))
"""


class WriterProcess:
    """Writers in a separate OS process with its own store; they start on :meth:`run`."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    @contextlib.asynccontextmanager
    async def started(cls, url: str, writers: Sequence[int]) -> AsyncIterator[WriterProcess]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            url,
            ",".join(str(w) for w in writers),
            str(EVENTS_PER_WRITER),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            async with asyncio.timeout(DEADLINE):
                ready = await process.stdout.readline()
            if ready.strip() != b"ready":
                _, stderr = await process.communicate()
                raise AssertionError(f"writer process did not start: {stderr.decode()}")
            yield cls(process)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    async def run(self) -> list[Pair]:
        async with asyncio.timeout(DEADLINE):
            stdout, stderr = await self.process.communicate(b"go\n")
        assert self.process.returncode == 0, stderr.decode()
        return [(position, event_id) for position, event_id in json.loads(stdout)]


async def test_writers_in_two_stores_and_another_process(log_settings: DatabaseSettings) -> None:
    # Three kinds of writer: two stores (separate engines and appender connections) in this
    # process and a third store in a child process. Tailers follow on both local stores, so
    # most of what each one sees was committed by someone else and reached it by NOTIFY.
    async with (
        open_store(log_settings, poll_seconds=POLL_SECONDS) as first,
        open_store(log_settings, poll_seconds=POLL_SECONDS) as second,
        WriterProcess.started(log_settings.url, [6, 7]) as child,
    ):
        writers: list[Callable[[], Awaitable[list[Pair]]]] = [
            partial(write_events, store, writer, EVENTS_PER_WRITER)
            for writer, store in enumerate([first, first, first, second, second, second])
        ]
        await race([*writers, child.run], [first, second])
    # Each writer chained its commits from the head it found under the write lock, whoever
    # had moved it: the chain runs unbroken over the whole log.
    await verified_chain(log_settings.url)
