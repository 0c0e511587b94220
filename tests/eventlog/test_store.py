"""EventStore contract, on a real database (SQLite, and PostgreSQL when configured)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import text
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError

from app.backends.sqlite.writer import SqliteWriter, blocks_within, insert_rows
from app.config import DatabaseSettings
from app.database import create_engine, upgrade_database
from app.eventlog import (
    Event,
    EventFilter,
    EventIdReused,
    EventStore,
    LogUnavailable,
    NewEvent,
    VersionConflict,
    canonical_payload,
)
from app.eventlog.store import page_query
from app.eventlog.tables import events as events_table
from tests.support import open_store, sqlite_settings, verified_chain

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def new(
    source_id: str = "a1",
    event: str = "progress",
    *,
    stream: str = "agents",
    event_id: str | None = None,
    expected_version: int | None = None,
    **payload: Any,
) -> NewEvent:
    return NewEvent(
        stream=stream,
        source_id=source_id,
        event=event,
        payload=canonical_payload(payload),
        event_id=event_id,
        expected_version=expected_version,
    )


async def read_all(store: EventStore, event_filter: EventFilter | None = None) -> list[Event]:
    found: list[Event] = []
    after = 0
    for _ in range(10_000):
        page = await store.read_after(after, event_filter, limit=7)
        found.extend(page.events)
        if page.scanned_to >= page.head:
            return found
        after = page.scanned_to
    raise AssertionError("read_after paging did not reach the head")


async def table_contents(url: str) -> list[tuple[Any, ...]]:
    """The events table as a brand-new engine (another process, after a restart) sees it."""
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                text(
                    "SELECT position, stream, source_id, version, event, event_id, payload"
                    " FROM events ORDER BY position"
                )
            )
            return [tuple(row) for row in rows]
    finally:
        await engine.dispose()


# -- appending ---------------------------------------------------------------------------------


async def test_append_one_returns_its_position_and_per_source_version(store: EventStore) -> None:
    assert await store.head() == 0

    first = await store.append_one(new("a1"))
    second = await store.append_one(new("a1"))
    other = await store.append_one(new("a2"))

    assert [(r.position, r.version, r.duplicate) for r in (first, second, other)] == [
        (1, 1, False),
        (2, 2, False),
        (3, 1, False),
    ]
    assert str(uuid.UUID(first.event_id)) == first.event_id
    assert TIMESTAMP.match(first.timestamp)
    assert await store.head() == 3
    assert await store.source_version("agents", "a1") == 2
    assert await store.source_version("agents", "nobody") == 0


async def test_append_batch_returns_consecutive_positions(store: EventStore) -> None:
    await store.append_one(new("a2"))

    found = await store.append([new("a1"), new("a2"), new("a1"), new("a3", stream="jobs")])

    assert [(r.position, r.version) for r in found] == [(2, 1), (3, 2), (4, 2), (5, 1)]
    assert len({r.timestamp for r in found}) == 1
    stored = (await store.read_after(1)).events
    assert [(e.position, e.source_id, e.version, e.event_id) for e in stored] == [
        (r.position, source, r.version, r.event_id)
        for r, source in zip(found, ["a1", "a2", "a1", "a3"], strict=True)
    ]


async def test_a_conflict_inside_a_batch_writes_nothing_of_it(store: EventStore) -> None:
    await store.append([new("a1"), new("a2")])
    before = (await store.read_after(0)).events

    with pytest.raises(VersionConflict) as raised:
        await store.append([new("a1"), new("a2", expected_version=0), new("a3")])

    assert (raised.value.source_id, raised.value.expected, raised.value.actual) == ("a2", 0, 1)
    assert await store.head() == 2
    assert (await store.read_after(0)).events == before
    assert await store.source_version("agents", "a1") == 1
    assert await store.source_version("agents", "a3") == 0
    # Nothing of the refused batch took a position or a version.
    after = await store.append_one(new("a1"))
    assert (after.position, after.version) == (3, 2)


async def test_a_conflict_refuses_only_its_own_request_among_concurrent_ones(
    store: EventStore,
) -> None:
    await store.append_one(new("a1"))
    requests = [[new(f"s{n}"), new(f"s{n}")] for n in range(30)]
    requests[13] = [new("s13"), new("a1", expected_version=5)]

    outcomes = await asyncio.gather(*(store.append(r) for r in requests), return_exceptions=True)

    assert isinstance(outcomes[13], VersionConflict)
    accepted = [o for n, o in enumerate(outcomes) if n != 13]
    assert all(isinstance(o, list) for o in accepted)
    positions = sorted(r.position for o in accepted if isinstance(o, list) for r in o)
    assert positions == list(range(2, 2 + 58))
    assert await store.head() == 59
    assert await store.source_version("agents", "s13") == 0


async def test_expected_version_on_a_new_and_an_existing_source(store: EventStore) -> None:
    created = await store.append_one(new("fresh", expected_version=0))
    assert (created.position, created.version) == (1, 1)

    with pytest.raises(VersionConflict) as raised:
        await store.append_one(new("fresh", expected_version=0))
    assert (raised.value.expected, raised.value.actual) == (0, 1)
    assert "expected_version 0" in str(raised.value)

    with pytest.raises(VersionConflict) as raised:
        await store.append_one(new("other", expected_version=3))
    assert raised.value.actual == 0

    following = await store.append_one(new("fresh", expected_version=1))
    assert following.version == 2
    assert await store.head() == 2


async def test_a_retried_append_returns_the_original_and_writes_nothing(store: EventStore) -> None:
    event_id = str(uuid.uuid4())
    original = await store.append_one(new("a1", event_id=event_id, n=1))
    await store.append_one(new("a1"))

    retried = await store.append_one(new("a1", event_id=event_id, n=1))

    assert retried == original._replace(duplicate=True)
    assert await store.head() == 2
    assert [e.event_id for e in (await store.read_after(0)).events].count(event_id) == 1


async def test_a_retried_batch_returns_every_original(store: EventStore) -> None:
    batch = [new(f"a{n}", event_id=str(uuid.uuid4()), n=n) for n in range(3)]
    original = await store.append(batch)

    assert await store.append(batch) == [r._replace(duplicate=True) for r in original]
    extended = await store.append([*batch, new("a9", event_id=str(uuid.uuid4()))])

    assert extended[:3] == [r._replace(duplicate=True) for r in original]
    assert (extended[3].position, extended[3].duplicate) == (4, False)
    assert await store.head() == 4


async def test_a_retry_with_expected_version_is_still_a_retry(store: EventStore) -> None:
    event = new("a1", event_id=str(uuid.uuid4()), expected_version=0)
    original = await store.append_one(event)

    assert await store.append_one(event) == original._replace(duplicate=True)


async def test_retries_racing_each_other_and_other_appends_write_once(
    store: EventStore,
) -> None:
    events = [new(f"s{n % 4}", event_id=str(uuid.uuid4()), n=n) for n in range(60)]
    # Every event sent three times at once, interleaved with appends without an id.
    calls = [store.append_one(event) for event in events for _ in range(3)]
    calls += [store.append_one(new("noise", n=n)) for n in range(40)]

    outcomes = await asyncio.gather(*calls)

    for n in range(60):
        attempts = outcomes[3 * n : 3 * n + 3]
        assert len({(r.position, r.version, r.event_id) for r in attempts}) == 1
        assert sum(not r.duplicate for r in attempts) == 1
    assert await store.head() == 100
    stored = await read_all(store)
    assert [e.position for e in stored] == list(range(1, 101))
    assert {e.event_id for e in stored} >= {event.event_id for event in events}


async def test_an_event_id_reused_for_other_content_is_refused(store: EventStore) -> None:
    event_id = str(uuid.uuid4())
    original = await store.append_one(new("a1", event_id=event_id, n=1))

    for changed in (
        new("a1", event_id=event_id, n=2),
        new("a1", "finished", event_id=event_id, n=1),
        new("a2", event_id=event_id, n=1),
    ):
        with pytest.raises(EventIdReused) as raised:
            await store.append([new("a3"), changed])
        assert raised.value.position == original.position
        assert event_id in str(raised.value)
    assert await store.head() == 1

    # Two different events racing under one new id: the first committed wins, the other is
    # refused with the winner's position, even when both land in the same transaction.
    contested = str(uuid.uuid4())
    outcomes = await asyncio.gather(
        store.append_one(new("a1", event_id=contested, n=1)),
        store.append_one(new("a1", event_id=contested, n=2)),
        return_exceptions=True,
    )
    won, lost = outcomes
    assert not isinstance(won, BaseException)
    assert isinstance(lost, EventIdReused)
    assert (won.position, lost.position) == (2, 2)
    assert [e.payload_dict() for e in await store.read_source("agents", "a1")] == [
        {"n": 1},
        {"n": 1},
    ]


async def test_malformed_appends_are_refused_before_reaching_the_log(store: EventStore) -> None:
    with pytest.raises(ValueError, match="at least one event"):
        await store.append([])
    event_id = str(uuid.uuid4())
    with pytest.raises(ValueError, match="unique"):
        await store.append([new(event_id=event_id, n=1), new(event_id=event_id, n=2)])
    assert await store.head() == 0


# -- reading -----------------------------------------------------------------------------------


@pytest.fixture
async def mixed_log(store: EventStore) -> list[Event]:
    """Forty events over two streams, four sources, three event names and three agents."""
    batch = [
        new(
            ["a1", "a2", "a3", "j1"][n % 4],
            ["started", "progress", "progress", "finished", "progress"][n % 5],
            stream="jobs" if n % 4 == 3 else "agents",
            agent_name=["tagger", "writer", "scout"][n % 3],
            n=n,
        )
        for n in range(40)
    ]
    await store.append(batch[:25])
    for event in batch[25:]:
        await store.append_one(event)
    return (await store.read_after(0)).events


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


FILTERS = [
    EventFilter(),
    EventFilter(streams=("jobs",)),
    EventFilter(source_ids=("a2",)),
    EventFilter(source_ids=("a1", "j1")),
    EventFilter(events=("finished",)),
    EventFilter(events=("started", "finished")),
    EventFilter(agent_names=("writer",)),
    EventFilter(agent_names=("writer", "scout"), events=("progress",)),
    EventFilter(streams=("agents",), source_ids=("a1", "a3"), agent_names=("tagger",)),
    EventFilter(streams=("agents",), source_ids=("a1", "j1")),
    EventFilter(streams=("jobs",), source_ids=("a1",), events=("finished",)),
    EventFilter(source_ids=("a2",), events=("finished",)),
    EventFilter(source_ids=("nobody",)),
]


@pytest.mark.parametrize(
    "event_filter",
    [
        EventFilter(source_ids=("a1",)),
        EventFilter(streams=("agents",), source_ids=("a1",)),
        EventFilter(streams=("agents",), source_ids=("a1", "a2"), events=("finished",)),
    ],
)
async def test_a_read_by_source_walks_the_source_index(
    tmp_path: Path, event_filter: EventFilter
) -> None:
    # Without statistics SQLite would otherwise walk the stream's index and test every
    # event of the stream: a page of one source's events would cost the whole stream.
    path = tmp_path / "plan.db"
    await upgrade_database(f"sqlite+aiosqlite:///{path}")
    sql = str(
        page_query(0, 10, event_filter, 100).compile(
            dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}
        )
    )
    with contextlib.closing(sqlite3.connect(path)) as connection:
        plan = " ".join(row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}"))
    assert "ix_events_source_id_position" in plan, plan


async def test_read_after_returns_exactly_the_matching_events(
    store: EventStore, mixed_log: list[Event]
) -> None:
    # One log, many filters (a database per filter would only make the suite slower).
    for event_filter in FILTERS:
        expected = [e for e in mixed_log if wanted(event_filter, e)]

        page = await store.read_after(0, event_filter)
        paged = await read_all(store, event_filter)
        later = await store.read_after(20, event_filter)

        assert page.events == expected, event_filter
        assert (page.scanned_to, page.head) == (40, 40), event_filter
        assert paged == expected, event_filter
        assert later.events == [e for e in expected if e.position > 20], event_filter
    jobs = [e for e in mixed_log if e.stream == "jobs"]
    assert {e.source_id for e in jobs} == {"j1"}
    assert len(jobs) == 10


async def test_a_page_that_cannot_be_read_fails_as_a_database_error(tmp_path: Path) -> None:
    """Long pages are fetched from SQLite's cursor directly; a failure there is raised as
    SQLAlchemy raises every other (DBAPIError), which the API answers with 503 and a tail
    retries, not as a bare sqlite3 error."""
    async with open_store(sqlite_settings(tmp_path, "thread")) as store:
        await store.append([new("a1"), new("a2")])
        assert [e.source_id for e in (await store.read_after(0)).events] == ["a1", "a2"]
        # Text that is not UTF-8 (a file written by something else) cannot be fetched.
        with contextlib.closing(sqlite3.connect(tmp_path / "events.db")) as raw, raw:
            raw.execute("UPDATE events SET source_id = CAST(X'FF' AS TEXT) WHERE position = 2")
        for limit in (1000, 10):  # a long page from the driver's cursor, a short one not
            with pytest.raises(DBAPIError, match="UTF-8"):
                await store.read_after(0, limit=limit)
            # Nor can frames built from it: they are read as text too.
            with pytest.raises(DBAPIError, match="UTF-8"):
                await store.read_frames_after(0, EventFilter(), limit, events_table.c.source_id)
        assert [e.source_id for e in (await store.read_after(0, limit=1)).events] == ["a1"]


def test_sqlite_quotes_every_character_as_msgspec_does() -> None:
    """Frames SQLite builds quote text with its json_quote: the same bytes as msgspec's for
    every character (the store checks a sample when it opens, this checks them all)."""
    every = "".join(chr(code) for code in range(0x110000) if not 0xD800 <= code <= 0xDFFF)
    with contextlib.closing(sqlite3.connect(":memory:")) as connection:
        (quoted,) = connection.execute("SELECT json_quote(?)", (every,)).fetchone()
    assert quoted == msgspec.json.encode(every).decode()


async def test_frames_are_built_by_sqlite_only_where_it_quotes_text_as_msgspec(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_store(sqlite_settings(tmp_path, "thread")) as store:
        assert store.frames_from_rows(EventFilter(streams=("agents",)))
        assert "quote JSON text" not in caplog.text
        # A filter the query does not apply whole: the rows are checked as events.
        assert not store.frames_from_rows(EventFilter(agent_names=("tagger",)))
    # A SQLite whose json_quote escapes otherwise (here, one registered over the built-in on
    # every connection, that escapes nothing) does not build frames.
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}")

    @sqlalchemy_event.listens_for(engine.sync_engine, "connect")
    def _quote_nothing(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.create_function("json_quote", 1, lambda text: f'"{text}"')

    store = await EventStore.open(engine, DatabaseSettings(sqlite_appender="thread"))
    try:
        assert not store.frames_from_rows(EventFilter())
        assert "does not quote JSON text as the service does" in caplog.text
    finally:
        await store.close()
        await engine.dispose()


async def test_a_full_page_is_scanned_to_its_last_event_a_short_one_to_the_head(
    store: EventStore, mixed_log: list[Event]
) -> None:
    full = await store.read_after(5, limit=10)
    assert [e.position for e in full.events] == list(range(6, 16))
    assert (full.scanned_to, full.head) == (15, 40)

    finished = EventFilter(events=("finished",))
    full_filtered = await store.read_after(0, finished, limit=2)
    assert [e.position for e in full_filtered.events] == [4, 9]
    assert full_filtered.scanned_to == 9

    short = await store.read_after(30, finished, limit=5)
    assert [e.position for e in short.events] == [34, 39]
    assert short.scanned_to == 40

    nothing = await store.read_after(40)
    assert (nothing.events, nothing.scanned_to, nothing.head) == ([], 40, 40)
    assert mixed_log[-1].position == 40


async def test_an_agent_name_page_never_claims_more_than_it_scanned(
    store: EventStore, mixed_log: list[Event]
) -> None:
    # agent_name is matched after the table read: a page may hold fewer events than the
    # limit, but its scanned_to must not skip any matching event beyond what it returned.
    scouts = EventFilter(agent_names=("scout",))
    page = await store.read_after(0, scouts, limit=6)

    assert [e.position for e in page.events] == [3, 6]
    assert page.scanned_to == 6
    assert await read_all(store, scouts) == [e for e in mixed_log if wanted(scouts, e)]


async def test_read_source_is_in_version_order_and_stops_at_until_position(
    store: EventStore,
) -> None:
    await asyncio.gather(*(store.append_one(new(f"a{n % 3}", n=n)) for n in range(30)))
    await store.append_one(new("a1", stream="jobs"))

    a1 = await store.read_source("agents", "a1")
    assert [e.version for e in a1] == list(range(1, 11))
    assert [e.position for e in a1] == sorted(e.position for e in a1)
    assert {(e.stream, e.source_id) for e in a1} == {("agents", "a1")}
    cut = a1[4].position
    assert await store.read_source("agents", "a1", until_position=cut) == a1[:5]
    assert await store.read_source("agents", "a1", until_position=0) == []
    assert [e.version for e in await store.read_source("jobs", "a1")] == [1]
    assert await store.read_source("agents", "nobody") == []


# -- group commit and durability -----------------------------------------------------------------


async def test_concurrent_appends_share_transactions_and_are_all_durable(
    store: EventStore, log_settings: DatabaseSettings
) -> None:
    before = store.metrics.transactions

    found = await asyncio.gather(*(store.append_one(new(f"s{n % 7}", n=n)) for n in range(200)))

    assert sorted(r.position for r in found) == list(range(1, 201))
    transactions = store.metrics.transactions - before
    assert transactions <= 20, f"200 appends took {transactions} transactions"
    rows = await table_contents(log_settings.url)
    assert [(row[0], row[5]) for row in rows] == sorted((r.position, r.event_id) for r in found)


def test_the_sqlite_writer_commits_durably(tmp_path: Path) -> None:
    # Both appenders (a process, a thread) write through this connection.
    asyncio.run(upgrade_database(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"))
    writer = SqliteWriter(tmp_path / "events.db", busy_timeout_ms=10_000, cache_kib=1024)
    writer.connect()
    try:
        connection: Any = writer._connection
        assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # Its commits never copy the WAL into the database: a thread beside it does.
        assert connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        # This SQLite (3.32 or later) takes large commits in blocks of rows per statement.
        assert writer._blocks == (1024, 256)
        plan = writer.commit([[new()]])
        assert not isinstance(plan, Exception)
        assert [row.position for row in plan.rows] == [1]
    finally:
        writer.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "events.db")) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("SELECT position, source_id FROM events").fetchall() == [(1, "a1")]


@contextlib.contextmanager
def write_lock_held_elsewhere(path: Path) -> Iterator[None]:
    """SQLite's write lock, held by another connection (as by another process) until the end."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.execute("ROLLBACK")


async def test_appends_arriving_during_a_commit_all_go_into_the_next_one(
    tmp_path: Path, appender: str
) -> None:
    async with open_store(sqlite_settings(tmp_path, appender)) as store:
        with write_lock_held_elsewhere(tmp_path / "events.db"):
            # The first transaction starts, and waits for the lock.
            first = asyncio.create_task(store.append_one(new("first")))
            await asyncio.sleep(0.2)
            rest = [asyncio.create_task(store.append_one(new(f"s{n}"))) for n in range(30)]
            await asyncio.sleep(0.2)  # handed over to the appender, which is still busy
            assert not first.done()

        found = await asyncio.gather(first, *rest)

        assert [r.position for r in found] == list(range(1, 32))
        batches = store.metrics.batch_events
        assert (batches.count, batches.total) == (2, 31)
        assert batches.cumulative()[0] == (1, 1)  # the first alone, then the other 30


async def test_a_write_turn_holds_appends_and_leaves_the_write_lock_free(
    tmp_path: Path, appender: str
) -> None:
    async with open_store(sqlite_settings(tmp_path, appender)) as store:
        async with store.write_turn():
            held = asyncio.create_task(store.append_one(new("held")))
            await asyncio.sleep(0.1)
            assert not held.done()
            # Another writer takes SQLite's write lock at once: no busy wait at all.
            with contextlib.closing(
                sqlite3.connect(tmp_path / "events.db", isolation_level=None, timeout=0)
            ) as other:
                other.execute("BEGIN IMMEDIATE")
                other.execute("ROLLBACK")
        result = await asyncio.wait_for(held, 5)
        assert (result.position, result.version) == (1, 1)


async def test_a_turn_given_up_while_waiting_does_not_hold_appends(
    tmp_path: Path, appender: str
) -> None:
    async with open_store(sqlite_settings(tmp_path, appender)) as store:

        async def take_turn() -> None:
            async with store.write_turn():
                raise AssertionError("the turn was given up before it came")

        async with store.write_turn():
            waiting = asyncio.create_task(take_turn())
            await asyncio.sleep(0.05)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        # The appender passes the abandoned turn by (it would otherwise wait out the busy
        # timeout of 10 s for a release that never comes).
        result = await asyncio.wait_for(store.append_one(new("after")), 2)
        assert result.position == 1


async def test_a_write_turn_on_a_closed_store_holds_nothing(tmp_path: Path, appender: str) -> None:
    async with open_store(sqlite_settings(tmp_path, appender)) as store:
        pass
    async with asyncio.timeout(2), store.write_turn():
        pass


async def test_a_large_commit_stores_every_event_in_order(store: EventStore) -> None:
    # 1,300 events in one request: on SQLite, one block of 1,024 rows, one of 256, and 20
    # rows one by one; appends racing it land before or after it, never inside.
    big = [new(f"s{n % 7}", n=n, text="é" * (n % 5)) for n in range(1300)]
    racing = [asyncio.create_task(store.append_one(new("other", n=n))) for n in range(40)]
    results = await store.append(big)
    await asyncio.gather(*racing)

    read = await read_all(store)
    assert [e.position for e in read] == list(range(1, 1341))
    mine = [e for e in read if e.source_id != "other"]
    assert [e.position for e in mine] == [r.position for r in results]
    assert mine[-1].position - mine[0].position == 1299
    assert [bytes(e.payload) for e in mine] == [bytes(e.payload) for e in big]
    for source in range(7):
        versions = [e.version for e in mine if e.source_id == f"s{source}"]
        assert versions == list(range(1, len(versions) + 1))
    assert [e.payload_dict()["n"] for e in read if e.source_id == "other"] == list(range(40))


@pytest.mark.parametrize("count", [0, 1, 255, 256, 257, 1023, 1024, 1283, 2000])
def test_insert_rows_writes_blocks_and_the_rest_in_order(tmp_path: Path, count: int) -> None:
    asyncio.run(upgrade_database(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"))
    rows = [
        (
            *(n + 1, "agents", f"s{n % 3}", n // 3 + 1, "progress", str(uuid.uuid4()), "t"),
            *(f"[{n}]", n.to_bytes(32, "big")),
        )
        for n in range(count)
    ]
    with contextlib.closing(sqlite3.connect(tmp_path / "events.db")) as connection:
        blocks = blocks_within(32_766, sqlite3.sqlite_version_info)
        assert blocks == (1024, 256)  # this SQLite takes them: the blocks are what is tested
        insert_rows(connection, rows, blocks)
        stored = connection.execute("SELECT * FROM events ORDER BY position").fetchall()
    assert stored == rows


def test_a_block_that_breaks_a_constraint_rolls_back_the_whole_transaction(
    tmp_path: Path,
) -> None:
    # Blocks are INSERT OR ROLLBACK: a failing block ends its transaction, so SQLite keeps
    # no statement journal to undo only that statement (a temporary file every page the
    # block touches was copied into, doubling what a commit writes).
    asyncio.run(upgrade_database(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"))
    rows = [
        (n + 2, "agents", "s", n + 2, "progress", str(uuid.uuid4()), "t", f"[{n}]", None)
        for n in range(1024)
    ]
    rows[700] = (*rows[700][:3], 1, *rows[700][4:])  # the version of the row before them
    with contextlib.closing(sqlite3.connect(tmp_path / "events.db", isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "INSERT INTO events VALUES (1, 'agents', 's', 1, 'progress', 'first', 't', '[]', NULL)"
        )
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            insert_rows(db, rows, (1024,))
        assert not db.in_transaction
        assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 0


def test_insert_blocks_fit_the_sqlite_parameter_limit() -> None:
    assert blocks_within(32_766, (3, 45, 0)) == (1024, 256)
    assert blocks_within(8 * 1024 - 1, (3, 45, 0)) == (256,)
    assert blocks_within(999, (3, 31, 1)) == ()  # before 3.32: every row by executemany
    # Before 3.8.8 a long VALUES list is a compound SELECT, capped at 500 terms.
    assert blocks_within(250_000, (3, 8, 7)) == ()


async def test_a_failed_transaction_fails_only_its_own_appends(
    tmp_path: Path, appender: str
) -> None:
    async with open_store(sqlite_settings(tmp_path, appender, busy_timeout_seconds=0.2)) as store:
        with write_lock_held_elsewhere(tmp_path / "events.db"):
            with pytest.raises(LogUnavailable, match="locked by another process"):
                await store.append_one(new())
            failure = store.metrics.last_failure
            assert failure is not None
            assert "SQLITE_BUSY_TIMEOUT_SECONDS" in failure.detail
            assert await store.probe() == (
                "the event log is locked by another process (SQLite's write lock is held)"
            )

        assert (await store.append_one(new())).position == 1
        assert store.metrics.failed_transactions == 1
        assert store.metrics.last_failure is None
        assert await store.probe() is None
    assert await store._appender.probe() == "the event log is closed"


async def test_postgres_appender_commits_durably(postgres_url: str) -> None:
    await upgrade_database(postgres_url)
    engine = create_engine(postgres_url)
    store = await EventStore.open(engine)
    try:
        await store.append_one(new())
        appender: Any = store._appender
        connection = appender._connection
        # Acknowledged means flushed: a commit waits for its WAL record to reach disk.
        assert await connection.fetchval("SHOW synchronous_commit") == "on"
        assert await connection.fetchval("SHOW fsync") == "on"
    finally:
        await store.close()
        await engine.dispose()


async def test_close_finishes_queued_appends_then_refuses_new_ones(
    log_settings: DatabaseSettings,
) -> None:
    await upgrade_database(log_settings.url)
    engine = create_engine(log_settings.url)
    store = await EventStore.open(engine, log_settings)
    try:
        pending = [asyncio.create_task(store.append_one(new(n=n))) for n in range(50)]
        await asyncio.sleep(0)  # let every task queue its append

        await store.close()

        assert sorted(t.result().position for t in pending) == list(range(1, 51))
        with pytest.raises(LogUnavailable):
            await store.append_one(new())
        with pytest.raises(LogUnavailable):
            await store.append([new(), new()])
        await store.close()  # idempotent
    finally:
        await store.close()
        await engine.dispose()
    assert len(await table_contents(log_settings.url)) == 50


PAYLOADS: list[dict[str, Any]] = [
    {"text": "héllo wörld ñ 日本語 Ελληνικά"},
    {"emoji": "🚀👩\u200d💻🏳️\u200d🌈", "key 🔑": "value"},
    {"empty": "", "": "empty key", "list": [], "object": {}},
    {"big": 123456789012345678901234567890, "negative": -123456789012345678901234567890},
    {"float": 0.1, "exp": 1.5e300, "tiny": -2.5e-300, "zero": 0, "negzero": -0.0},
    {"nested": {"a": [1, {"b": [None, True, False, {"c": {"d": "deep"}}]}], "z": {}}},
    {"escapes": 'quote " backslash \\ newline \n tab \t nul \x00 sep \u2028 \u2029 ctrl \x1f'},
    {"zebra": 1, "apple": 2, "mango": {"y": 1, "b": 2}},
]


async def test_payloads_come_back_byte_for_byte(
    store: EventStore, log_settings: DatabaseSettings
) -> None:
    canonical = [bytes(canonical_payload(payload)) for payload in PAYLOADS]
    results = await store.append([new(f"p{n}", **p) for n, p in enumerate(PAYLOADS)])
    single = await store.append_one(new("single", **PAYLOADS[1]))

    read = (await store.read_after(0)).events
    assert [bytes(e.payload) for e in read] == [*canonical, canonical[1]]
    assert [e.payload_dict() for e in read[:-1]] == PAYLOADS
    assert read[3].payload_dict()["big"] == 123456789012345678901234567890
    # Key order is the client's, not the database's (no JSONB normalisation).
    assert bytes(read[7].payload).startswith(b'{"zebra":1,"apple":2,"mango":{"y":1')
    assert [bytes(e.payload) for e in await store.read_source("agents", "p1")] == [canonical[1]]
    rows = await table_contents(log_settings.url)
    assert [row[6].encode() for row in rows] == [*canonical, canonical[1]]
    assert [r.position for r in results] + [single.position] == [e.position for e in read]


async def test_postgres_appenders_follow_each_other_s_appends(postgres_url: str) -> None:
    # Each appender plans on what it committed last, brought up to date under the lock with
    # what others appended since, or, past what one statement reads, with each source read.
    from app.backends.postgres.appender import CATCH_UP

    async with open_store(postgres_url) as first, open_store(postgres_url) as second:
        for version in range(3):  # the last ones alone: one round trip each
            done = await first.append_one(new("a1", expected_version=version))
            assert done.version == version + 1
        assert (await second.append_one(new("a1", expected_version=3))).version == 4
        # Planned alone, refused (the head moved), then planned on the events since.
        assert (await first.append_one(new("a1", expected_version=4))).version == 5
        with pytest.raises(VersionConflict):
            await second.append_one(new("a1", expected_version=4))
        replayed = await second.append_one(new("a1", event_id=done.event_id))
        assert replayed.duplicate
        assert replayed.position == done.position
        for start in range(0, CATCH_UP + 1, 1000):
            await second.append(
                [new(f"b{n}") for n in range(start, min(start + 1000, CATCH_UP + 1))]
            )
        assert (await second.append_one(new("a1", expected_version=5))).version == 6
        assert (await first.append_one(new("a1", expected_version=6))).version == 7
        with pytest.raises(VersionConflict):
            await first.append_one(new("b7", expected_version=0))
    assert await verified_chain(postgres_url) == CATCH_UP + 8
