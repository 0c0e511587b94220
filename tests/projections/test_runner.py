"""The projection runner: each event applied exactly once, the checkpoint moving in the same
transaction as the rows, across crashes, concurrent runners and rebuilds.

A counting projection (events, sum of positions and last position per source, in a table of
its own) makes a double-applied or skipped event visible as a wrong row."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import statistics
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    event,
    func,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.backends import backend_of
from app.database import create_engine
from app.eventlog import Event, EventFilter, EventStore, NewEvent, canonical_payload
from app.eventlog import store as store_module
from app.eventlog.tables import events
from app.projections import ProjectionRunner, UnknownProjection, checkpoints
from app.runtime.services import Services
from tests.support import ROOT, busy_log, new_agent_event, open_store

NAME = "counts"
count_metadata = MetaData()
counts = Table(
    "test_event_counts",
    count_metadata,
    Column("source_id", String(200), primary_key=True),
    Column("events", Integer, nullable=False),
    Column("position_sum", BigInteger, nullable=False),
    Column("last_position", BigInteger, nullable=False),
)

Rows = dict[str, tuple[int, int, int]]


class Crash(Exception):
    pass


class CountingProjection:
    """Counts the ``agent`` stream's events per source. ``crash_on_call``: the nth call to
    :meth:`apply` does all its writes, then raises (or, with ``kill``, ends the process)."""

    name = NAME
    tables: Sequence[Table] = (counts,)
    source_filter = EventFilter(streams=("agent",))

    def __init__(self, *, crash_on_call: int | None = None, kill: bool = False) -> None:
        self.crash_on_call = crash_on_call
        self.kill = kill
        self.calls = 0
        self.applied = 0

    async def apply(self, connection: AsyncConnection, batch: Sequence[Event]) -> None:
        self.calls += 1
        totals: dict[str, list[int]] = {}
        for item in batch:
            total = totals.setdefault(item.source_id, [0, 0, 0])
            total[0] += 1
            total[1] += item.position
            total[2] = item.position
        insert: Any = backend_of(connection).insert(counts)
        await connection.execute(
            insert.on_conflict_do_update(
                index_elements=["source_id"],
                set_={
                    "events": counts.c.events + insert.excluded.events,
                    "position_sum": counts.c.position_sum + insert.excluded.position_sum,
                    "last_position": insert.excluded.last_position,
                },
            ),
            [
                {"source_id": s, "events": n, "position_sum": total, "last_position": last}
                for s, (n, total, last) in totals.items()
            ],
        )
        if self.calls == self.crash_on_call:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise Crash(f"crashed in apply call {self.calls}, after its writes")
        self.applied += len(batch)


@dataclass
class Log:
    url: str
    engine: AsyncEngine
    store: EventStore


@contextlib.asynccontextmanager
async def open_log(url: str, *, feed_capacity: int = 10_000) -> AsyncIterator[Log]:
    async with open_store(
        url, tables=count_metadata, feed_capacity=feed_capacity, pool_size=4
    ) as store:
        yield Log(url, store.engine, store)


@pytest.fixture
async def log(database_url: str) -> AsyncIterator[Log]:
    async with open_log(database_url) as opened:
        yield opened


async def append_events(store: EventStore, count: int, rng: random.Random) -> None:
    """``count`` events over 12 sources, one in five of them on a stream the projection
    ignores, in appends of 1 to 25 events."""
    while count > 0:
        size = min(count, rng.randint(1, 25))
        count -= size
        await store.append(
            [
                NewEvent(
                    "other" if rng.random() < 0.2 else "agent",
                    f"source-{rng.randrange(12)}",
                    rng.choice(("started", "progress", "complete")),
                    canonical_payload({"agent_name": "counter", "n": rng.random()}),
                )
                for _ in range(size)
            ]
        )


def _rows(result: Any) -> Rows:
    return {row[0]: (int(row[1]), int(row[2]), int(row[3])) for row in result}


async def projected(engine: AsyncEngine) -> Rows:
    async with engine.connect() as connection:
        return _rows(await connection.execute(select(counts)))


async def expected(connection: AsyncConnection, up_to: int | None = None) -> Rows:
    """What the projection must hold: the log's agent events, counted by the database."""
    query = (
        select(
            events.c.source_id,
            func.count(),
            func.sum(events.c.position),
            func.max(events.c.position),
        )
        .where(events.c.stream == "agent")
        .group_by(events.c.source_id)
    )
    if up_to is not None:
        query = query.where(events.c.position <= up_to)
    return _rows(await connection.execute(query))


async def expected_now(engine: AsyncEngine) -> Rows:
    async with engine.connect() as connection:
        return await expected(connection)


async def consistent_snapshot(engine: AsyncEngine) -> tuple[int, Rows, Rows]:
    """The checkpoint, the rows and what the log says up to the checkpoint, all read in one
    snapshot: a checkpoint that moved without its rows (or rows without it) shows here."""
    async with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection = await connection.execution_options(isolation_level="REPEATABLE READ")
        async with connection.begin():
            position = int(
                (
                    await connection.execute(
                        select(checkpoints.c.position).where(checkpoints.c.name == NAME)
                    )
                ).scalar_one_or_none()
                or 0
            )
            rows = _rows(await connection.execute(select(counts)))
            return position, rows, await expected(connection, position)


async def checkpoint_of(engine: AsyncEngine) -> int:
    position, rows, wanted = await consistent_snapshot(engine)
    assert rows == wanted, f"rows disagree with the checkpoint {position}"
    return position


# -- crashes ---------------------------------------------------------------------------------


async def test_a_crash_after_the_writes_rolls_back_the_step_and_nothing_is_applied_twice(
    log: Log,
) -> None:
    await append_events(log.store, 400, random.Random(1))
    head = await log.store.head()
    projection = CountingProjection(crash_on_call=3)
    runner = ProjectionRunner(log.engine, [projection], batch_size=50)

    with pytest.raises(Crash):
        await runner.catch_up(NAME)

    # Two steps committed (50 agent events each); the third's writes were rolled back with it.
    position = await checkpoint_of(log.engine)
    assert 0 < position < head
    assert sum(n for n, _, _ in (await projected(log.engine)).values()) == 100

    projection.crash_on_call = None
    assert await runner.catch_up(NAME) == head

    assert await checkpoint_of(log.engine) == head
    resumed = await projected(log.engine)
    assert resumed == await expected_now(log.engine)
    # The same rows as a clean run from position 0.
    assert await ProjectionRunner(log.engine, [CountingProjection()]).rebuild(NAME) == head
    assert await projected(log.engine) == resumed


async def test_a_failed_checkpoint_write_rolls_back_the_rows(log: Log) -> None:
    await append_events(log.store, 120, random.Random(2))
    runner = ProjectionRunner(log.engine, [CountingProjection()], batch_size=1000)
    first = await runner.catch_up(NAME)
    before = await projected(log.engine)
    await append_events(log.store, 80, random.Random(3))
    head = await log.store.head()

    def refuse_checkpoint(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE PROJECTION_CHECKPOINTS"):
            raise Crash("the checkpoint could not be written")

    event.listen(log.engine.sync_engine, "before_cursor_execute", refuse_checkpoint)
    try:
        with pytest.raises(Crash):
            await runner.catch_up(NAME)
    finally:
        event.remove(log.engine.sync_engine, "before_cursor_execute", refuse_checkpoint)

    assert await checkpoint_of(log.engine) == first
    assert await projected(log.engine) == before

    assert await runner.catch_up(NAME) == head
    assert await checkpoint_of(log.engine) == head
    assert await projected(log.engine) == await expected_now(log.engine)


async def _crash_in_a_child(url: str) -> None:
    engine = create_engine(url, pool_size=2)
    runner = ProjectionRunner(
        engine, [CountingProjection(crash_on_call=3, kill=True)], batch_size=40
    )
    await runner.catch_up(NAME)


async def test_a_killed_process_leaves_rows_and_checkpoint_in_agreement(log: Log) -> None:
    await append_events(log.store, 300, random.Random(4))
    head = await log.store.head()
    code = (
        "import asyncio, sys\n"
        "from tests.projections.test_runner import _crash_in_a_child\n"
        "asyncio.run(_crash_in_a_child(sys.argv[1]))\n"
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, log.url, cwd=ROOT, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == -signal.SIGKILL, stderr.decode()

    # SIGKILL in the middle of the third step: the first two are there, the third is not.
    assert 0 < await checkpoint_of(log.engine) < head
    assert sum(n for n, _, _ in (await projected(log.engine)).values()) == 80

    runner = ProjectionRunner(log.engine, [CountingProjection()], batch_size=40)
    assert await runner.catch_up(NAME) == head
    assert await checkpoint_of(log.engine) == head
    assert await projected(log.engine) == await expected_now(log.engine)


# -- concurrency -----------------------------------------------------------------------------


async def test_two_runners_on_two_engines_apply_every_event_once(log: Log) -> None:
    other_engine = create_engine(log.url, pool_size=2)
    try:
        first, second = CountingProjection(), CountingProjection()
        runners = [
            ProjectionRunner(log.engine, [first], batch_size=20),
            ProjectionRunner(other_engine, [second], batch_size=20),
        ]
        done = asyncio.Event()

        async def write() -> None:
            rng = random.Random(5)
            for _ in range(15):
                await append_events(log.store, 40, rng)
                await asyncio.sleep(0)
            done.set()

        async def project(runner: ProjectionRunner) -> None:
            while not done.is_set():
                await runner.catch_up(NAME)
                await asyncio.sleep(0.01)
            await runner.catch_up(NAME)

        await asyncio.wait_for(
            asyncio.gather(write(), *(project(runner) for runner in runners)), 120
        )

        head = await log.store.head()
        assert await checkpoint_of(log.engine) == head
        rows = await projected(log.engine)
        assert rows == await expected_now(log.engine)
        # Exactly once across the two: together they were handed each agent event once.
        assert first.applied + second.applied == sum(n for n, _, _ in rows.values())
    finally:
        await other_engine.dispose()


async def test_a_checkpoint_moved_after_the_page_was_read_is_not_applied_twice(
    log: Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runner reads its page before it takes the write lock; when another process moves
    the checkpoint in between, the page it read is stale and must be read again under the
    lock, not applied."""
    import app.projections.runner as runner_module

    await append_events(log.store, 60, random.Random(9))
    other_engine = create_engine(log.url, pool_size=2)
    try:
        slow, other = CountingProjection(), CountingProjection()
        slow_runner = ProjectionRunner(log.engine, [slow], batch_size=1000)
        other_runner = ProjectionRunner(other_engine, [other], batch_size=20)
        await other_runner.catch_up(NAME, until=0)  # checkpoints exist, nothing applied yet
        read_page = runner_module.read_page
        interleaved = False

        async def page_then_the_other_runner(*args: Any, **kwargs: Any) -> Any:
            nonlocal interleaved
            page = await read_page(*args, **kwargs)
            if not interleaved:  # the slow runner's first read, before its lock
                interleaved = True
                # Part of the way: the stale page overlaps what the other runner applied.
                assert 0 < await other_runner.catch_up(NAME, until=20) < await log.store.head()
            return page

        monkeypatch.setattr(runner_module, "read_page", page_then_the_other_runner)
        head = await log.store.head()
        assert await slow_runner.catch_up(NAME) == head
        assert interleaved
        assert other.applied > 0
        assert slow.applied + other.applied == sum(
            n for n, _, _ in (await projected(log.engine)).values()
        )
        assert await projected(log.engine) == await expected_now(log.engine)
    finally:
        await other_engine.dispose()


async def test_rebuilds_while_events_keep_arriving_end_consistent(log: Log) -> None:
    live = ProjectionRunner(log.engine, [CountingProjection()], store=log.store, poll_seconds=0.2)
    other_engine = create_engine(log.url, pool_size=2)
    try:
        await append_events(log.store, 100, random.Random(8))
        await live.start()
        # Another process (the command line) rebuilding while this one projects live.
        elsewhere = ProjectionRunner(other_engine, [CountingProjection()], batch_size=30)
        done = asyncio.Event()
        snapshots: list[tuple[int, Rows, Rows]] = []

        async def write() -> None:
            rng = random.Random(6)
            for _ in range(20):
                await append_events(log.store, 30, rng)
                snapshots.append(await consistent_snapshot(log.engine))
            done.set()

        async def rebuild() -> None:
            for runner in (live, elsewhere, live, elsewhere):
                position = await runner.rebuild(NAME)
                assert position > 0
                snapshots.append(await consistent_snapshot(log.engine))
                await asyncio.sleep(0.02)

        await asyncio.wait_for(asyncio.gather(write(), rebuild()), 120)
        await done.wait()
        head = await log.store.head()
        assert await live.wait_for(NAME, head, within=30)

        for position, rows, wanted in snapshots:
            assert rows == wanted, f"inconsistent at checkpoint {position}"
        assert await checkpoint_of(log.engine) == head
        assert await projected(log.engine) == await expected_now(log.engine)
    finally:
        await live.close()
        await other_engine.dispose()


# -- waiting and naming ----------------------------------------------------------------------


async def test_wait_for_times_out_then_sees_another_runner_catch_up(log: Log) -> None:
    await append_events(log.store, 50, random.Random(7))
    head = await log.store.head()
    projector = ProjectionRunner(log.engine, [CountingProjection()])
    other_engine = create_engine(log.url, pool_size=2)
    try:
        # A reader in another process: it never projects, it watches the checkpoint.
        reader = ProjectionRunner(other_engine, [CountingProjection()])
        assert await reader.wait_for(NAME, head, within=0.2) is False
        assert await projector.wait_for(NAME, head, within=0.2) is False

        waiting = asyncio.create_task(reader.wait_for(NAME, head, within=60))
        await asyncio.sleep(0)  # it is waiting before anyone projects
        assert not waiting.done()
        assert await projector.catch_up(NAME) == head

        assert await asyncio.wait_for(waiting, 60) is True
        assert await projector.wait_for(NAME, head, within=0) is True
        assert await reader.wait_for(NAME, head + 1, within=0.2) is False
    finally:
        await other_engine.dispose()


class RecordingProjection:
    """Keeps (in memory) the positions of the events it was given, in order."""

    tables: Sequence[Table] = ()

    def __init__(self, name: str, source_filter: EventFilter) -> None:
        self.name = name
        self.source_filter = source_filter
        self.positions: list[int] = []

    async def apply(self, connection: AsyncConnection, batch: Sequence[Event]) -> None:
        self.positions.extend(item.position for item in batch)


class PageRead(NamedTuple):
    statement: str
    #: The payloads' bytes the read returned.
    payload_bytes: int


@contextlib.contextmanager
def page_reads() -> Iterator[list[PageRead]]:
    """The pages of events read meanwhile (a page is read between two positions; the store's
    own tail reads only one bound), as the store fetches them: on SQLite its rows come from
    the driver's cursor, which SQLAlchemy's statement events do not see."""
    reads: list[PageRead] = []
    fetch = store_module._rows

    async def counted(
        connection: AsyncConnection, query: Any, limit: int
    ) -> Sequence[Sequence[Any]]:
        rows = await fetch(connection, query, limit)
        statement = str(query)
        if "FROM events" in statement and "events.position <=" in statement:
            reads.append(PageRead(statement, sum(len(row[-1]) for row in rows)))
        return rows

    store_module._rows = counted
    try:
        yield reads
    finally:
        store_module._rows = fetch


def three_projections(
    log: Log, *, feed: bool = False
) -> tuple[ProjectionRunner, RecordingProjection, RecordingProjection]:
    """The counting projection, one recording every event and one recording the "other"
    stream's, 10 events a page each; with ``feed``, the runner follows the log's store."""
    everything = RecordingProjection("everything", EventFilter())
    others = RecordingProjection("others", EventFilter(streams=("other",)))
    runner = ProjectionRunner(
        log.engine,
        [CountingProjection(), everything, others],
        store=log.store if feed else None,
        batch_size=10,
    )
    return runner, everything, others


async def assert_recorded_every_event(
    log: Log, everything: RecordingProjection, others: RecordingProjection
) -> None:
    async with log.engine.connect() as connection:
        query = select(events.c.position, events.c.stream).order_by(events.c.position)
        rows = (await connection.execute(query)).all()
    assert everything.positions == [position for position, _ in rows]
    assert others.positions == [position for position, stream in rows if stream == "other"]
    assert await projected(log.engine) == await expected_now(log.engine)


async def test_projections_at_one_checkpoint_share_each_read_and_get_their_own_events(
    log: Log,
) -> None:
    runner, everything, others = three_projections(log)
    await append_events(log.store, 120, random.Random(7))
    # "everything" goes ahead alone, so the next step starts from two checkpoints.
    assert await runner.catch_up("everything", until=35) >= 35
    with page_reads() as reads:
        await runner._catch_up_together(sorted(runner.projections))
        head = await log.store.head()
        await assert_recorded_every_event(log, everything, others)

        # Level now: 25 new events are one read for all three (30 a page: 10 for each).
        await append_events(log.store, 25, random.Random(8))
        reads.clear()
        reached = await runner._catch_up_together(sorted(runner.projections))
        assert len(reads) == 1, reads
        assert set(reached.values()) == {head + 25}
    assert len(everything.positions) == head + 25
    assert everything.positions == sorted(set(everything.positions))
    assert await projected(log.engine) == await expected_now(log.engine)


async def test_rebuilding_together_folds_every_projection_from_zero_with_shared_reads(
    log: Log,
) -> None:
    runner, everything, others = three_projections(log)
    await append_events(log.store, 95, random.Random(9))
    await runner.catch_up(NAME)
    async with log.engine.begin() as connection:  # a wrong row the rebuild must replace
        await connection.execute(counts.update().values(events=counts.c.events + 1000))
    with page_reads() as reads:
        reached = await runner.rebuild_together([NAME, "everything", "others"])
    head = await log.store.head()
    assert reached == {NAME: head, "everything": head, "others": head}
    assert len(reads) == 4  # 95 events, 30 a shared page: 4 reads, not 10 for each of 3
    assert everything.positions == list(range(1, head + 1))
    await assert_recorded_every_event(log, everything, others)
    assert await checkpoint_of(log.engine) == head


async def test_a_runner_behind_reads_large_events_a_bounded_number_of_bytes_at_a_time(
    log: Log,
) -> None:
    """Pages from the table hold about ``page_bytes`` of events, whatever their size: a
    runner that fell behind the feed must not read hundreds of MB of large events at once."""
    blob = "x" * 8_000
    for first in range(0, 90, 15):
        await log.store.append(
            [
                NewEvent(
                    "other" if n % 3 == 0 else "agent",
                    f"source-{n % 5}",
                    "progress",
                    canonical_payload({"agent_name": "big", "n": n, "blob": blob}),
                )
                for n in range(first, first + 15)
            ]
        )
    everything = RecordingProjection("everything", EventFilter())
    others = RecordingProjection("others", EventFilter(streams=("other",)))
    # 30 events a projection, 90 a shared read: 720 KB a read without the byte bound.
    runner = ProjectionRunner(
        log.engine,
        [CountingProjection(), everything, others],
        batch_size=30,
        page_bytes=64 * 1024,
    )
    with page_reads() as reads:
        reached = await runner._catch_up_together(sorted(runner.projections))
    read_bytes = [read.payload_bytes for read in reads]
    assert set(reached.values()) == {90}
    assert len(read_bytes) > 10, read_bytes
    assert max(read_bytes) <= 64 * 1024, read_bytes
    await assert_recorded_every_event(log, everything, others)


@pytest.mark.parametrize("feed_capacity", [10_000, 20])
async def test_a_runner_that_keeps_up_takes_its_pages_from_the_feed(
    database_url: str, feed_capacity: int
) -> None:
    async with open_log(database_url, feed_capacity=feed_capacity) as log:
        runner, everything, others = three_projections(log, feed=True)
        await append_events(log.store, 95, random.Random(11))
        with page_reads() as reads:
            await runner._catch_up_together(sorted(runner.projections))
        # The feed holds its newest events only: what it no longer holds comes from the
        # table, 30 events a read (75 of 95 with room for 20: 3 reads).
        assert len(reads) == (0 if feed_capacity > 95 else 3)
        await assert_recorded_every_event(log, everything, others)

        # Level now: new events come from the feed whatever its size.
        await append_events(log.store, 15, random.Random(12))
        with page_reads() as reads:
            await runner._catch_up_together(sorted(runner.projections))
        assert reads == []
        await assert_recorded_every_event(log, everything, others)


@contextlib.contextmanager
def step_writes(store: EventStore, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Counts the store's write turns (steps under the lock) and guarded writes (steps made
    by the log's writer) while the block runs."""
    counted = {"turns": 0, "guarded": 0}
    write_turn, write_guarded = store.write_turn, store.write_guarded

    def counted_turn() -> Any:
        counted["turns"] += 1
        return write_turn()

    async def counted_write(write: Any) -> bool:
        counted["guarded"] += 1
        return await write_guarded(write)

    monkeypatch.setattr(store, "write_turn", counted_turn)
    monkeypatch.setattr(store, "write_guarded", counted_write)
    yield counted


async def test_steps_are_written_by_the_log_appender_and_hold_no_appends(
    log: Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner, everything, others = three_projections(log, feed=True)
    for seed in (21, 22, 23):
        await append_events(log.store, 40, random.Random(seed))
        with step_writes(log.store, monkeypatch) as counted:
            await runner._catch_up_together(sorted(runner.projections))
        assert counted == {"turns": 0, "guarded": 1}
        await assert_recorded_every_event(log, everything, others)


async def test_a_checkpoint_moved_before_the_writer_makes_the_step_sends_it_under_the_lock(
    log: Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step folded at one checkpoint is written only if the checkpoint is still there;
    another process moving it in between sends the step back, to be taken under the lock."""
    await append_events(log.store, 60, random.Random(13))
    head = await log.store.head()
    other_engine = create_engine(log.url, pool_size=2)
    try:
        runner = ProjectionRunner(
            log.engine, [CountingProjection()], store=log.store, batch_size=1000
        )
        other_runner = ProjectionRunner(
            other_engine, [other := CountingProjection()], batch_size=20
        )
        write_guarded = log.store.write_guarded
        answers: list[bool] = []

        async def another_process_first(write: Any) -> bool:
            if not answers:
                assert 0 < await other_runner.catch_up(NAME, until=20) < head
            answers.append(await write_guarded(write))
            return answers[-1]

        monkeypatch.setattr(log.store, "write_guarded", another_process_first)
        with step_writes(log.store, monkeypatch) as counted:
            assert await runner.catch_up(NAME) == head
        assert answers == [False]  # refused, nothing written
        assert counted == {"turns": 1, "guarded": 1}  # then taken under the lock
        assert other.applied > 0
        assert await checkpoint_of(log.engine) == head
        assert await projected(log.engine) == await expected_now(log.engine)
    finally:
        await other_engine.dispose()


async def test_catch_up_on_an_empty_log_is_at_zero(log: Log) -> None:
    runner = ProjectionRunner(log.engine, [CountingProjection()])
    assert await runner.catch_up(NAME) == 0
    assert await runner.checkpoint(NAME) == 0
    assert await runner.wait_for(NAME, 0, within=0) is True
    assert await projected(log.engine) == {}


async def test_unknown_projection_names_the_known_ones(services: Services) -> None:
    runner = services.projections
    known = sorted(runner.projections)
    assert "agents" in known
    for attempt in (
        runner.catch_up("nope"),
        runner.rebuild("nope"),
        runner.wait_for("nope", 1, within=0.1),
    ):
        with pytest.raises(UnknownProjection) as caught:
            await attempt
        message = caught.value.args[0]
        assert "nope" in message
        for name in known:
            assert name in message
    with pytest.raises(KeyError):
        runner.get("nope")


async def test_reads_see_their_own_writes_while_appends_keep_the_log_busy(
    services: Services,
) -> None:
    # The log's writer is never idle; a reader's write must still reach the agents
    # projection promptly. On SQLite the projection's step takes a turn between two of the
    # appender's transactions: polling for the write lock, it lost nearly every retry to the
    # appender, and the wait grew past a second within a few seconds of such load.
    store, runner = services.store, services.projections
    loop = asyncio.get_running_loop()
    waits: list[float] = []
    async with busy_log(store) as appended:
        for attempt in range(15):
            await asyncio.sleep(0.1)
            written = await store.append_one(new_agent_event("reader", f"write {attempt}"))
            started = loop.time()
            assert await runner.wait_for("agents", written.position, within=5.0)
            waits.append(loop.time() - started)
    assert sum(appended) > 15 * 2000  # the log was busy throughout
    # Starved steps show as waits that keep growing. One slow wait in fifteen is the machine
    # (two cores shared with other test workers), not the lock; two are not.
    assert sorted(waits)[-2] < 1.0, waits
    assert statistics.median(waits) < 0.5, waits
