"""The agent activity projection behind ``GET /agents``: its fold rules, the live read model
against a rebuild from position 0, and the filters and stalled computation of its reads."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

import app.projections.agents as agents_module
from app.eventlog import Event, EventStore, NewEvent, canonical_payload
from app.events.envelope import utc_now
from app.events.plan import AppendResult
from app.projections import AgentProjection, ProjectionRunner
from app.projections.agents import (
    ActivityRow,
    agent_activities,
    list_activities,
    load_activity,
)
from app.runtime.services import Services

AGENT_KINDS = ("started", "progress", "heartbeat", "complete", "failed")


def parse_timestamp(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


async def report(
    store: EventStore, source_id: str, kind: str, stream: str = "agent", **payload: Any
) -> AppendResult:
    payload.setdefault("agent_name", "tagger")
    return await store.append_one(NewEvent(stream, source_id, kind, canonical_payload(payload)))


async def caught_up(services: Services) -> int:
    head = await services.store.head()
    assert await services.projections.wait_for("agents", head, within=60)
    return head


async def activity(services: Services, source_id: str) -> ActivityRow:
    await caught_up(services)
    async with services.engine.connect() as connection:
        row = await load_activity(connection, source_id, heartbeat_seconds=3600)
    assert row is not None, source_id
    return row


async def table_rows(services: Services) -> list[dict[str, Any]]:
    async with services.engine.connect() as connection:
        result = await connection.execute(
            select(agent_activities).order_by(agent_activities.c.source_id)
        )
        return [dict(row._mapping) for row in result]


# -- live read model == rebuild from position 0 ----------------------------------------------


def random_report(rng: random.Random, sources: list[str]) -> NewEvent:
    roll = rng.random()
    stream = "ingest" if roll < 0.04 else "agent"  # same source ids, another stream: ignored
    # Now and then the watchdog's mark, which moves no last_seen.
    kind = rng.choices((*AGENT_KINDS, "stalled"), weights=(1, 4, 3, 1, 1, 1))[0]
    payload: dict[str, Any] = {"agent_name": rng.choice(("tagger", "summariser", "indexer"))}
    if rng.random() < 0.3:
        payload["status"] = rng.choice(("running", "waiting", "retrying", "stalled"))
    if rng.random() < 0.5:
        payload["message"] = rng.choice(("", "working", "Processing video 5/10", "ünïcødé ✓"))
    if rng.random() < 0.4:
        payload["progress"] = rng.choice((0, 1, rng.random(), round(rng.random(), 2)))
    if kind == "complete" and rng.random() < 0.6:
        payload["result"] = rng.choice(
            ({"tags": ["a", "b"], "count": 2}, "done", 42, [1, {"x": None}], True)
        )
    if kind == "failed":
        choice = rng.random()
        if choice < 0.4:
            payload["error"] = "boom"
        elif choice < 0.6:
            payload["result"] = {"code": rng.randrange(256)}
    if rng.random() < 0.2:
        payload["extra"] = {"attempt": rng.randrange(5), "note": "x" * rng.randrange(40)}
    return NewEvent(stream, rng.choice(sources), kind, canonical_payload(payload))


async def test_live_read_model_equals_a_rebuild_from_zero(services: Services) -> None:
    rng = random.Random(20261124)
    sources = [f"run-{index:02d}" for index in range(20)]
    reports = [random_report(rng, sources) for _ in range(3000)]
    chunks: list[list[NewEvent]] = []
    while reports:
        size = rng.choice((1, 1, 1, rng.randint(2, 40)))
        chunks.append(reports[:size])
        reports = reports[size:]
    queue: asyncio.Queue[list[NewEvent]] = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)

    async def produce() -> None:
        # Several producers: the live projection folds while appends keep arriving.
        while not queue.empty():
            chunk = queue.get_nowait()
            if len(chunk) == 1:
                await services.store.append_one(chunk[0])
            else:
                await services.store.append(chunk)

    await asyncio.wait_for(asyncio.gather(*(produce() for _ in range(6))), 120)
    head = await caught_up(services)
    assert head == 3000
    live = await table_rows(services)

    # Independently of the fold: each row sits on its source's last agent event.
    log = (await services.store.read_after(0, limit=5000)).events
    assert len(log) == head
    last: dict[str, Event] = {}
    spoke: dict[str, Event] = {}  # the last event that is not the watchdog's mark
    for item in log:
        if item.stream == "agent":
            last[item.source_id] = item
            if item.event != "stalled" or item.source_id not in spoke:
                spoke[item.source_id] = item
    assert [row["source_id"] for row in live] == sorted(last)
    assert any(event.event == "stalled" for event in last.values())
    for row in live:
        final = last[row["source_id"]]
        assert (row["position"], row["version"]) == (final.position, final.version)
        assert row["updated_at"] == final.timestamp
        assert row["last_seen"] == spoke[row["source_id"]].timestamp
        assert row["stalled_at"] == (final.timestamp if final.event == "stalled" else None)
        if final.event == "complete":
            assert (row["status"], row["completed_at"]) == ("completed", final.timestamp)
        elif final.event == "failed":
            assert (row["status"], row["completed_at"]) == ("failed", final.timestamp)

    assert await services.projections.rebuild("agents") == head
    assert await table_rows(services) == live
    # And once more with pages cut elsewhere, by a runner of another process.
    other = ProjectionRunner(services.engine, [AgentProjection()], batch_size=37)
    assert await other.rebuild("agents") == head
    assert await table_rows(services) == live


# -- the fold rules, on a hand-made sequence -------------------------------------------------


async def test_a_first_report_opens_the_activity(services: Services) -> None:
    store = services.store
    first = await report(store, "job-a", "progress", message="warming up", progress=0.1)

    row = await activity(services, "job-a")

    assert row == ActivityRow(
        source_id="job-a",
        agent_name="tagger",
        status="running",
        message="warming up",
        progress=0.1,
        started_at=first.timestamp,  # no `started` yet: the first event opens it
        updated_at=first.timestamp,
        completed_at=None,
        result=None,
        last_seen=first.timestamp,
        position=first.position,
        version=1,
    )


async def test_started_progress_heartbeat_complete(services: Services) -> None:
    store = services.store
    started = await report(store, "job-a", "started", message="starting")
    row = await activity(services, "job-a")
    assert (row.status, row.started_at, row.progress, row.message) == (
        "running",
        started.timestamp,
        None,
        "starting",
    )

    await report(store, "job-a", "progress", progress=0.25, message="5/20")
    heartbeat = await report(store, "job-a", "heartbeat")
    row = await activity(services, "job-a")
    # A heartbeat keeps what it does not mention, and moves last_seen.
    assert (row.status, row.progress, row.message) == ("running", 0.25, "5/20")
    assert row.last_seen == row.updated_at == heartbeat.timestamp
    assert (row.position, row.version) == (heartbeat.position, 3)

    await report(store, "job-a", "progress", status="waiting", message="rate limited")
    row = await activity(services, "job-a")
    assert (row.status, row.progress, row.message) == ("waiting", 0.25, "rate limited")

    await report(store, "job-a", "heartbeat", status="running", agent_name="tagger-v2")
    row = await activity(services, "job-a")
    assert (row.status, row.agent_name) == ("running", "tagger-v2")

    await report(store, "job-a", "progress", progress=1)
    assert (await activity(services, "job-a")).progress == 1.0

    done = await report(store, "job-a", "complete", result={"tags": ["a", "b"], "count": 2})
    row = await activity(services, "job-a")
    assert row.status == "completed"
    assert row.completed_at == done.timestamp
    assert row.started_at == started.timestamp
    assert row.result == {"tags": ["a", "b"], "count": 2}

    late = await report(store, "job-a", "heartbeat")
    row = await activity(services, "job-a")
    # A late heartbeat does not reopen a finished activity.
    assert (row.status, row.completed_at, row.last_seen) == (
        "completed",
        done.timestamp,
        late.timestamp,
    )


async def test_complete_defaults_progress_to_one(services: Services) -> None:
    store = services.store
    await report(store, "plain", "started")
    await report(store, "plain", "progress", progress=0.4)
    await report(store, "plain", "complete")
    await report(store, "partial", "started")
    await report(store, "partial", "progress", progress=0.3)
    await report(store, "partial", "complete", progress=0.9, result="partial")

    plain = await activity(services, "plain")
    partial = await activity(services, "partial")

    assert (plain.status, plain.progress, plain.result) == ("completed", 1.0, None)
    assert (partial.status, partial.progress, partial.result) == ("completed", 0.9, "partial")


async def test_failed_records_the_error_as_result(services: Services) -> None:
    store = services.store
    for source in ("by-error", "by-message", "by-result"):
        await report(store, source, "started", message="starting")
    first = await report(store, "by-error", "failed", error="boom")
    await report(store, "by-message", "failed", message="disk full")
    await report(store, "by-result", "failed", error="killed", result={"code": 137})

    by_error = await activity(services, "by-error")
    by_message = await activity(services, "by-message")
    by_result = await activity(services, "by-result")

    assert (by_error.status, by_error.completed_at) == ("failed", first.timestamp)
    assert by_error.result == {"error": "boom"}
    assert by_error.message == "starting"
    assert (by_message.result, by_message.message) == ({"error": "disk full"}, "disk full")
    assert by_result.result == {"code": 137}


async def test_fields_of_another_json_type_are_passed_over_or_kept_as_sent(
    services: Services,
) -> None:
    """The fold reads a field only as the type it means (text, a number); a result or error
    is kept as whatever JSON was sent, null for none."""
    store = services.store
    await report(store, "odd", "started", message="starting", progress=0.25)
    # A number message, a true progress, a list status: none of them is taken.
    await report(store, "odd", "progress", agent_name=7, message=5, progress=True, status=[1])
    row = await activity(services, "odd")
    assert (row.agent_name, row.message, row.progress, row.status) == (
        "tagger",
        "starting",
        0.25,
        "running",
    )
    # An integer progress is taken, as a float.
    await report(store, "odd", "progress", progress=1)
    assert (await activity(services, "odd")).progress == 1.0
    # A progress sent as null keeps complete from setting it to 1.0; a null result is none.
    await report(store, "null-progress", "started", progress=0.5)
    await report(store, "null-progress", "complete", progress=None, result=None)
    row = await activity(services, "null-progress")
    assert (row.status, row.progress, row.result) == ("completed", 0.5, None)
    # A failure's error of any JSON type, null included, or else its message of any type.
    await report(store, "null-error", "failed", error=None, message="ignored")
    await report(store, "number-message", "failed", message=5)
    await report(store, "nested-error", "failed", error={"code": [1, 2.5, "x\n"]})
    await report(store, "no-error", "failed")
    assert (await activity(services, "null-error")).result == {"error": None}
    assert (await activity(services, "number-message")).result == {"error": 5}
    assert (await activity(services, "nested-error")).result == {"error": {"code": [1, 2.5, "x\n"]}}
    assert (await activity(services, "no-error")).result == {"error": None}


async def test_started_again_reopens_a_finished_activity(services: Services) -> None:
    store = services.store
    await report(store, "job-r", "started")
    await report(store, "job-r", "failed", error="flaky")
    again = await report(store, "job-r", "started", message="retry 1")

    row = await activity(services, "job-r")

    assert (row.status, row.started_at, row.completed_at, row.result) == (
        "running",
        again.timestamp,
        None,
        None,
    )
    assert row.version == 3


async def test_stalled_event_and_the_heartbeat_that_revives_it(services: Services) -> None:
    store = services.store
    started = await report(store, "job-s", "started")
    marked = await report(store, "job-s", "stalled")
    row = await activity(services, "job-s")
    assert row.status == "stalled"
    # last_seen: when the agent last spoke; the mark has a field of its own.
    assert (row.last_seen, row.stalled_at, row.updated_at) == (
        started.timestamp,
        marked.timestamp,
        marked.timestamp,
    )

    revived = await report(store, "job-s", "heartbeat")
    row = await activity(services, "job-s")
    assert row.status == "running"
    assert (row.last_seen, row.stalled_at) == (revived.timestamp, None)


async def test_other_streams_do_not_touch_agent_rows(services: Services) -> None:
    store = services.store
    started = await report(store, "shared-id", "started", message="agent")
    await report(store, "shared-id", "complete", stream="ingest", message="ingest")

    row = await activity(services, "shared-id")

    assert (row.status, row.message, row.position) == ("running", "agent", started.position)
    async with services.engine.connect() as connection:
        assert await load_activity(connection, "no-such", heartbeat_seconds=10) is None


# -- reads: filters, paging, stalled ---------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Reads decide "stalled" against this clock instead of the wall clock."""
    fake = Clock()
    real: Callable[..., str] = agents_module.stalled_before

    def stalled_before(heartbeat_seconds: float, now: datetime | None = None) -> str:
        return real(heartbeat_seconds, now or fake.now)

    monkeypatch.setattr(agents_module, "stalled_before", stalled_before)
    return fake


async def _clock_passes(timestamp: str, margin: float) -> None:
    """Until the log's clock is ``margin`` seconds past ``timestamp`` (bounded)."""
    target = parse_timestamp(timestamp) + timedelta(seconds=margin)
    for _ in range(1000):
        if parse_timestamp(utc_now()) > target:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the clock did not move")


async def _list(services: Services, **filters: Any) -> list[tuple[str, str]]:
    async with services.engine.connect() as connection:
        rows = await list_activities(connection, heartbeat_seconds=10, **filters)
    return [(row.source_id, row.status) for row in rows]


@pytest.fixture
async def activities(services: Services, clock: Clock) -> None:
    """Old activities (reported to long ago for a 10 s heartbeat, by the fake clock) and fresh
    ones; listed newest first, they are:

    fresh-run (tagger, running), fresh-wait (summariser, waiting), old-stalled (tagger,
    reported stalled), old-failed (summariser), old-done (tagger), old-wait (summariser,
    waiting), old-run (tagger, running)."""
    store = services.store
    await report(store, "old-run", "started", agent_name="tagger")
    await report(store, "old-wait", "progress", agent_name="summariser", status="waiting")
    await report(store, "old-done", "started", agent_name="tagger")
    await report(store, "old-done", "complete", agent_name="tagger")
    await report(store, "old-failed", "failed", agent_name="summariser", error="x")
    last_old = await report(store, "old-stalled", "stalled", agent_name="tagger")
    await _clock_passes(last_old.timestamp, 0.06)
    first_fresh = await report(
        store, "fresh-wait", "progress", agent_name="summariser", status="waiting"
    )
    await report(store, "fresh-run", "started", agent_name="tagger")
    await caught_up(services)
    # "Now" is three heartbeats after the midpoint between the two groups.
    old, fresh = parse_timestamp(last_old.timestamp), parse_timestamp(first_fresh.timestamp)
    clock.now = old + (fresh - old) / 2 + timedelta(seconds=30)


ALL = [
    ("fresh-run", "running"),
    ("fresh-wait", "waiting"),
    ("old-stalled", "stalled"),
    ("old-failed", "failed"),
    ("old-done", "completed"),
    ("old-wait", "stalled"),
    ("old-run", "stalled"),
]


FILTERED: list[tuple[dict[str, Any], list[tuple[str, str]]]] = [
    ({}, ALL),  # newest first, the quiet unfinished ones stalled
    ({"statuses": ["running"]}, [("fresh-run", "running")]),
    ({"statuses": ["waiting"]}, [("fresh-wait", "waiting")]),
    (
        {"statuses": ["stalled"]},
        [("old-stalled", "stalled"), ("old-wait", "stalled"), ("old-run", "stalled")],
    ),
    (
        {"statuses": ["completed", "failed"]},
        [("old-failed", "failed"), ("old-done", "completed")],
    ),
    (
        {"statuses": ["running", "stalled"]},
        [
            ("fresh-run", "running"),
            ("old-stalled", "stalled"),
            ("old-wait", "stalled"),
            ("old-run", "stalled"),
        ],
    ),
    (
        {"agent_names": ["summariser"]},
        [("fresh-wait", "waiting"), ("old-failed", "failed"), ("old-wait", "stalled")],
    ),
    (
        {"agent_names": ["tagger"], "statuses": ["stalled"]},
        [("old-stalled", "stalled"), ("old-run", "stalled")],
    ),
    ({"agent_names": ["nobody"]}, []),
    ({"limit": 2}, ALL[:2]),
]


@pytest.mark.usefixtures("activities")
async def test_list_filters_and_stalled(services: Services) -> None:
    for filters, expected in FILTERED:
        assert await _list(services, **filters) == expected, filters


@pytest.mark.usefixtures("activities")
async def test_list_pages_by_position(services: Services) -> None:
    seen: list[tuple[str, str]] = []
    before: int | None = None
    for _ in range(10):
        async with services.engine.connect() as connection:
            page = await list_activities(connection, heartbeat_seconds=10, limit=3, before=before)
        if not page:
            break
        seen.extend((row.source_id, row.status) for row in page)
        before = page[-1].position
    assert seen == ALL


@pytest.mark.usefixtures("activities")
async def test_one_activity_is_stalled_by_the_same_rule(services: Services, clock: Clock) -> None:
    async with services.engine.connect() as connection:
        found = {
            source_id: await load_activity(connection, source_id, heartbeat_seconds=10)
            for source_id in ("old-run", "fresh-run", "old-done")
        }
    assert {key: row.status if row else None for key, row in found.items()} == {
        "old-run": "stalled",
        "fresh-run": "running",
        "old-done": "completed",
    }

    # Much later, every unfinished activity is stalled; finished ones stay finished.
    clock.now += timedelta(hours=1)
    assert await _list(services) == [
        ("fresh-run", "stalled"),
        ("fresh-wait", "stalled"),
        ("old-stalled", "stalled"),
        ("old-failed", "failed"),
        ("old-done", "completed"),
        ("old-wait", "stalled"),
        ("old-run", "stalled"),
    ]
    assert await _list(services, statuses=["running", "waiting"]) == []


@pytest.mark.usefixtures("activities")
async def test_a_new_report_revives_a_stalled_activity(services: Services, clock: Clock) -> None:
    revived = await report(services.store, "old-run", "heartbeat", agent_name="tagger")
    await caught_up(services)
    clock.now = parse_timestamp(revived.timestamp) + timedelta(seconds=29)

    assert ("old-run", "running") in await _list(services, statuses=["running"])
    clock.now = parse_timestamp(revived.timestamp) + timedelta(seconds=31)
    assert ("old-run", "stalled") in await _list(services, statuses=["stalled"])


async def test_with_the_wall_clock_recent_activities_are_not_stalled(services: Services) -> None:
    await report(services.store, "now-run", "started")
    await report(services.store, "now-stalled", "stalled")
    await caught_up(services)
    async with services.engine.connect() as connection:
        rows = await list_activities(connection, heartbeat_seconds=3600)
    assert [(row.source_id, row.status) for row in rows] == [
        ("now-stalled", "stalled"),
        ("now-run", "running"),
    ]
