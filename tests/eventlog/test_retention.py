"""Retention: expired events are archived (complete segments, manifest last) before they leave
the table; every event stays in the table or in a segment; reads name what is gone."""

from __future__ import annotations

import gzip
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
from sqlalchemy import func, select

from app.config.retention import parse_rule
from app.eventlog import Event, EventFilter, EventStore, NewEvent, Truncated, canonical_payload
from app.eventlog.archives import archived_segments, history, list_segments
from app.eventlog.retention import Retention, pending_by_rule
from app.eventlog.tables import events
from app.eventlog.tail import replay_then_tail

RULES = [parse_rule(rule) for rule in ("agent/heartbeat=7d", "agent=90d", "ingest=keep")]


def _event(stream: str, source_id: str, name: str, n: int) -> NewEvent:
    payload = canonical_payload({"agent_name": "tagger", "message": f"{name} {n}"})
    return NewEvent(stream=stream, source_id=source_id, event=name, payload=payload)


async def fill(store: EventStore, sources: int = 3, rounds: int = 40) -> list[Event]:
    """Agent activities that report and beat (heartbeats far more often), and ingests."""
    for round_ in range(rounds):
        batch = []
        for source in range(sources):
            batch.append(_event("agent", f"run-{source}", "heartbeat", round_))
            if round_ % 4 == 0:
                batch.append(_event("agent", f"run-{source}", "progress", round_))
            if round_ % 10 == 0:
                batch.append(_event("ingest", f"ingest-{source}", "progress", round_))
        await store.append(batch)
    return await every_event(store)


async def every_event(store: EventStore) -> list[Event]:
    return (await store.read_after(0, limit=100_000)).events


def days_later(days: float) -> datetime:
    return datetime.now(UTC) + timedelta(days=days)


async def test_a_purge_archives_expired_events_before_removing_them(
    store: EventStore, tmp_path: Path
) -> None:
    written = await fill(store)
    async with store.engine.connect() as connection:
        chains = dict((await connection.execute(select(events.c.position, events.c.chain))).all())
    archive = tmp_path / "log-archive"
    retention = Retention(
        store, RULES, archive, batch_events=25, delete_rows=7, clock=lambda: days_later(8)
    )
    result = await retention.purge()

    kept = await every_event(store)
    newest = {}
    for event in written:
        newest[(event.stream, event.source_id)] = event.position
    expected_gone = [
        event
        for event in written
        if event.event == "heartbeat" and newest[(event.stream, event.source_id)] != event.position
    ]
    # Heartbeats older than 7 days went, but each source's newest event stays (versions count
    # on from it); progress (90 days) and ingests (kept) stay.
    assert result.removed == len(expected_gone) > 0
    assert [e.position for e in kept] == sorted(
        set(e.position for e in written) - {e.position for e in expected_gone}
    )
    # In batches of 25, in position order, each a complete segment on disk.
    assert len(result.segments) == -(-len(expected_gone) // 25)
    archived: list[Event] = []
    for segment in result.segments:
        data = (archive / segment.name).read_bytes()
        manifest = json.loads(
            (archive / segment.name.replace(".ndjson.gz", ".manifest.json")).read_text()
        )
        assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
        lines = gzip.decompress(data).splitlines()
        assert len(lines) == manifest["count"] == segment.count
        found = [msgspec.json.decode(line, type=Event) for line in lines]
        assert (found[0].position, found[-1].position) == (
            manifest["first_position"],
            manifest["last_position"],
        )
        assert manifest["streams"] == {"agent": {"heartbeat": segment.count}}
        # The chain values at its ends, as the log held them (app/events/chain.py).
        for end, position in (
            ("first_chain", found[0].position),
            ("last_chain", found[-1].position),
        ):
            value = chains[position]
            assert manifest[end] == (None if value is None else bytes(value).hex())
        archived.extend(found)
    assert archived == expected_gone  # byte for byte, in the export format

    # Every event is in the table or in a segment, and the whole history reads back in order.
    async with store.engine.connect() as connection:
        merged = [event async for page in history(connection, archive) for event in page]
        recorded = (
            await connection.execute(select(func.count()).select_from(archived_segments))
        ).scalar_one()
        assert not any(
            count for _, count in await pending_by_rule(connection, RULES, days_later(8))
        )
    assert merged == written
    assert recorded == len(result.segments)

    # Nothing more has expired: a second purge removes nothing; a new append to a purged
    # source goes on with its versions.
    assert (await retention.purge()).removed == 0
    result_append = await store.append([_event("agent", "run-0", "heartbeat", 999)])
    assert result_append[0].version == max(e.version for e in written if e.source_id == "run-0") + 1


async def test_a_replay_reaching_into_removed_events_is_told_where_they_are(
    store: EventStore, tmp_path: Path
) -> None:
    written = await fill(store, rounds=20)
    archive = tmp_path / "log-archive"
    retention = Retention(store, RULES, archive, batch_events=20, clock=lambda: days_later(8))
    result = await retention.purge()
    assert len(result.segments) >= 2

    async def replay(after: int, event_filter: EventFilter) -> tuple[list[str], list[int]]:
        named: list[str] = []
        positions: list[int] = []
        head = written[-1].position
        async for item in replay_then_tail(
            store, after, event_filter, idle_timeout=0.2, report_truncated=True
        ):
            if isinstance(item, Truncated):
                named.extend(segment.name for segment in item.segments)
                continue
            positions.extend(entry.position for entry in item)
            if (positions and positions[-1] >= head) or not item:
                break
        return named, positions

    kept = {event.position for event in await every_event(store)}
    named, positions = await replay(0, EventFilter())
    assert named == [segment.name for segment in result.segments]
    assert positions == sorted(kept)

    # Resumed inside the second segment: the first is not named, the rest are.
    second = result.segments[1]
    named, positions = await replay(second.first_position, EventFilter())
    assert named == [segment.name for segment in result.segments[1:]]
    assert positions == sorted(p for p in kept if p > second.first_position)

    # A reader of ingests had nothing removed: it is told nothing.
    named, positions = await replay(0, EventFilter(streams=("ingest",)))
    assert named == []
    assert positions == [e.position for e in written if e.stream == "ingest"]


async def test_an_interrupted_purge_leaves_nothing_that_looks_complete(
    store: EventStore, tmp_path: Path
) -> None:
    written = await fill(store, rounds=12)
    archive = tmp_path / "log-archive"
    retention = Retention(store, RULES, archive, batch_events=10, clock=lambda: days_later(8))
    # A segment written but whose rows were never removed (the process died between the two),
    # and a temporary file cut short.
    from app.eventlog import archives

    async with store.engine.connect() as connection:
        from app.eventlog.retention import expired_events

        expired = await expired_events(connection, RULES, days_later(8), 10)
    segment, data = archives.build_segment(expired.events, expired.chains)
    archives.write_segment(archive, segment, data)
    (archive / f".{segment.name}.abc.tmp").write_bytes(data[:20])

    result = await retention.purge()
    # The leftovers were removed, and their events archived again by this purge.
    assert sorted(path.name for path in archive.iterdir() if path.name.startswith(".")) == []
    async with store.engine.connect() as connection:
        recorded = await list_segments(connection)
        merged = [event async for page in history(connection, archive) for event in page]
    assert {s.name for s in recorded} == {s.name for s in result.segments}
    assert sorted(p.name for p in archive.glob("*.ndjson.gz")) == sorted(s.name for s in recorded)
    assert merged == written
    async with store.engine.connect() as connection:
        total = (await connection.execute(select(func.count()).select_from(events))).scalar_one()
    assert total + result.removed == len(written)


async def test_each_event_follows_the_most_specific_rule_that_names_it(
    store: EventStore, tmp_path: Path
) -> None:
    for round_ in range(4):
        await store.append(
            [
                _event(stream, f"{stream}-{n}", name, round_)
                for stream in ("agent", "other")
                for name in ("heartbeat", "progress")
                for n in range(2)
            ]
        )
    written = await every_event(store)
    newest = {(e.stream, e.source_id): e.position for e in written}
    rules = [parse_rule(r) for r in ("agent=keep", "*/heartbeat=7d", "*=90d")]

    async def removed_after(days: int) -> set[tuple[str, str]]:
        retention = Retention(store, rules, tmp_path / "a", clock=lambda: days_later(days))
        await retention.purge()
        kept = {e.position for e in await every_event(store)}
        return {
            (e.stream, e.event)
            for e in written
            if e.position not in kept and newest[(e.stream, e.source_id)] != e.position
        }

    # agent=keep wins over */heartbeat for the agent stream; */heartbeat over *.
    assert await removed_after(8) == {("other", "heartbeat")}
    assert await removed_after(91) == {("other", "heartbeat"), ("other", "progress")}
