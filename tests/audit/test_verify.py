"""The log's hash chain: written by every appender, recomputed by ``audit verify``, which
names the first position where a copy of a real log was tampered with, and how."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app.audit.history import read_chained
from app.audit.verify import ArchivedRange, Broken, ChainedEvent, Verified, verify_history
from app.config import DatabaseSettings
from app.database import create_engine, upgrade_database
from app.eventlog import EventStore, NewEvent, VersionConflict, canonical_payload
from app.eventlog.imports import import_events
from app.events.chain import chain_rows
from app.events.envelope import Event, decode_event, encode_event
from tests.conftest import _admin, drop_postgres_database
from tests.support import open_store
from tests.test_cli_commands import run_cli

#: The events the real log below holds.
LOGGED = 60


def _new(source_id: str, n: int, **fields: Any) -> NewEvent:
    payload = canonical_payload({"agent_name": "tagger", "message": f"step {n} · ✓", "n": n})
    return NewEvent("agent", source_id, "progress", payload, **fields)


async def _fill(store: EventStore, other: EventStore) -> None:
    """Appends of every shape: alone, batched, concurrent, refused, retried, and some by
    another store on the same log (another instance: this one's cached head is stale)."""
    for n in range(10):
        await store.append_one(_new("a1", n))
    await store.append([_new(f"b{n % 3}", n) for n in range(20)])
    retried = _new("a2", 0, event_id="0190f0c4-3b7e-7c3a-9b1e-5d2f8a6c4e10")
    await store.append_one(retried)
    with pytest.raises(VersionConflict):
        await store.append([_new("a1", 99, expected_version=0)])
    await store.append_one(retried)  # a retry: nothing written
    await other.append([_new("c1", n) for n in range(9)])
    await asyncio.gather(*(store.append_one(_new(f"d{n}", n)) for n in range(20)))


async def _rows(url: str) -> list[ChainedEvent]:
    engine = create_engine(url, pool_size=1)
    try:
        return await read_chained(engine, 0, 10_000)
    finally:
        await engine.dispose()


def _as_documented(rows: list[ChainedEvent]) -> list[bytes]:
    """docs/architecture.md's recipe, followed without the service's code."""
    previous, values = bytes(32), []
    for row in rows:
        event = msgspec.json.decode(encode_event(row.event))
        fields = [event[name] for name in ("position", "stream", "source_id", "version")]
        fields += [event[name] for name in ("event", "event_id", "timestamp")]
        canonical = "\n".join(map(str, fields)).encode() + b"\n" + bytes(row.event.payload)
        previous = hashlib.sha256(previous + canonical).digest()
        values.append(previous)
    return values


async def test_every_appender_chains_its_events_in_commit_order(
    log_settings: DatabaseSettings,
) -> None:
    async with open_store(log_settings) as store, open_store(log_settings) as other:
        await _fill(store, other)
        head = await store.head()

    rows = await _rows(log_settings.url)

    assert [row.event.position for row in rows] == list(range(1, LOGGED + 1))
    assert head == LOGGED
    assert [row.chain for row in rows] == _as_documented(rows)
    assert verify_history(rows) == Verified(LOGGED, LOGGED, rows[-1].chain)


async def test_events_appended_with_the_chain_off_are_chained_by_the_next_append_with_it_on(
    log_settings: DatabaseSettings,
) -> None:
    off = msgspec.structs.replace(log_settings, audit_chain=False)
    async with open_store(log_settings) as store:
        await store.append([_new("a1", n) for n in range(5)])
    async with open_store(off) as store:
        await store.append([_new("a1", n) for n in range(5, 12)])
    unchained = await _rows(log_settings.url)
    assert [row.chain is None for row in unchained] == [False] * 5 + [True] * 7
    assert verify_history(unchained) == Broken(
        6,
        "no chain value",
        "the row holds none (appended with AUDIT_CHAIN=0; an append with the chain on fills it in)",
        5,
    )

    async with open_store(log_settings) as store:
        await store.append_one(_new("a1", 12))

    rows = await _rows(log_settings.url)
    assert [row.chain for row in rows] == _as_documented(rows)
    assert isinstance(verify_history(rows), Verified)


# -- tampering with a copy of a real log --------------------------------------------------


@pytest.fixture
async def real_log(database_url: str) -> str:
    async with open_store(database_url) as store, open_store(database_url) as other:
        await _fill(store, other)
    return database_url


@contextlib.asynccontextmanager
async def copy_of(url: str, tmp_path: Path) -> AsyncIterator[str]:
    """A copy of the log at ``url`` (nobody has it open), dropped afterwards."""
    database = make_url(url).database
    assert database is not None
    if url.startswith("sqlite"):
        copy = tmp_path / "copy.db"
        with sqlite3.connect(database) as source, sqlite3.connect(copy) as target:
            source.backup(target)
        yield f"sqlite+aiosqlite:///{copy}"
        return
    name = f"{database}_copy"
    await _admin(f'CREATE DATABASE "{name}" TEMPLATE "{database}"')
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        await drop_postgres_database(name)


async def tamper(url: str, *statements: str) -> None:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.begin() as connection:
            for statement in statements:
                await connection.execute(text(statement))
    finally:
        await engine.dispose()


async def recompute_stored_chain(url: str) -> None:
    """What an attacker with write access does after an edit: every stored value recomputed
    from the content, so that the table agrees with itself again."""
    rows = await _rows(url)
    values = chain_rows(bytes(32), [_columns(row.event) for row in rows])
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                text("UPDATE events SET chain = :chain WHERE position = :position"),
                [
                    {"chain": value, "position": row.event.position}
                    for row, value in zip(rows, values, strict=True)
                ],
            )
    finally:
        await engine.dispose()


def _columns(event: Event) -> tuple[Any, ...]:
    return (*msgspec.structs.astuple(event)[:7], bytes(event.payload).decode())


FORGED = """UPDATE events SET payload = '{"agent_name":"tagger","message":"forged"}'"""


async def swap_contents(url: str, first: int, second: int) -> None:
    """Two rows' events trade places, each chain value staying at its position."""
    chains = {row.event.position: row.chain for row in await _rows(url)}
    await tamper(
        url,
        f"UPDATE events SET position = -{first} WHERE position = {first}",
        f"UPDATE events SET position = {first} WHERE position = {second}",
        f"UPDATE events SET position = {second} WHERE position = -{first}",
    )
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.begin() as connection:
            for position in (first, second):
                await connection.execute(
                    text("UPDATE events SET chain = :chain WHERE position = :position"),
                    {"chain": chains[position], "position": position},
                )
    finally:
        await engine.dispose()


async def test_an_untouched_copy_verifies(real_log: str, tmp_path: Path) -> None:
    async with copy_of(real_log, tmp_path) as copy:
        rows = await _rows(copy)
        done = await run_cli("audit", "verify", env={"DATABASE_URL": copy})

    assert (done.code, done.stderr) == (0, "")
    head = rows[-1].chain
    assert head is not None
    assert done.stdout == f"verified {LOGGED} events, head {LOGGED} (chain {head.hex()})\n"


@pytest.mark.parametrize(
    ("statements", "expected"),
    [
        pytest.param(
            [f"{FORGED} WHERE position = 17"],
            "chain broken at position 17: edited row: its content does not give the chain "
            "value it holds (recomputed ",
            id="edited",
        ),
        pytest.param(
            ["DELETE FROM events WHERE position IN (23, 24)"],
            "chain broken at position 23: deleted rows: positions 23-24 are missing (the next "
            "event is at 25)",
            id="deleted",
        ),
        pytest.param(
            [
                "UPDATE events SET position = -31 WHERE position = 31",
                "UPDATE events SET position = 31 WHERE position = 30",
                "UPDATE events SET position = 30 WHERE position = -31",
            ],
            "chain broken at position 30: reordered rows: the event now at position 31 was "
            "written at 30",
            id="reordered",
        ),
        pytest.param(
            swap_contents,
            "chain broken at position 12: reordered rows: the event now at position 13 was "
            "written at 12",
            id="reordered-content",
        ),
    ],
)
async def test_verify_names_the_first_position_where_a_copy_was_tampered_with_and_how(
    real_log: str,
    tmp_path: Path,
    statements: list[str] | Callable[[str, int, int], Awaitable[None]],
    expected: str,
) -> None:
    async with copy_of(real_log, tmp_path) as copy:
        if callable(statements):
            await statements(copy, 12, 13)
        else:
            await tamper(copy, *statements)
        done = await run_cli("audit", "verify", env={"DATABASE_URL": copy})

    assert done.code == 1, done
    assert done.stdout.startswith(expected), done.stdout


# -- archive segments ---------------------------------------------------------------------


def _segment(directory: Path, events: list[Event], chains: list[bytes | None]) -> ArchivedRange:
    """A segment as retention writes one: gzip NDJSON envelopes, the chain values of its
    ends in its manifest; read back from its file whenever verified."""
    path = directory / f"events-{events[0].position}-{events[-1].position}.ndjson.gz"
    path.write_bytes(gzip.compress(b"".join(encode_event(e) + b"\n" for e in events)))

    def read() -> Iterator[Event]:
        with gzip.open(path) as lines:
            yield from (decode_event(line) for line in lines)

    last = chains[-1]
    assert last is not None
    return ArchivedRange(
        path.name, events[0].position, events[-1].position, len(events), chains[0], last, read
    )


async def test_segments_and_the_table_verify_as_one_history(real_log: str, tmp_path: Path) -> None:
    rows = await _rows(real_log)
    segments = [
        _segment(tmp_path, [r.event for r in rows[start:end]], [r.chain for r in rows[start:end]])
        for start, end in ((0, 20), (20, 35))
    ]

    found = verify_history(rows[35:], segments=segments)

    assert found == Verified(LOGGED, LOGGED, rows[-1].chain)
    # Rows a purge has archived but not yet removed are in both: verified once.
    assert verify_history(rows[30:], segments=segments) == found
    # Retention archives some events and keeps those between them: the two interleave.
    odd = [r for r in rows if r.event.position % 2 and r.event.position <= 40]
    interleaved = _segment(tmp_path, [r.event for r in odd], [r.chain for r in odd])
    kept = [r for r in rows if not (r.event.position % 2 and r.event.position <= 40)]
    assert verify_history(kept, segments=[interleaved]) == found
    # A range in neither.
    assert verify_history(rows[36:], segments=segments) == Broken(
        36, "deleted rows", "positions 36-36 are missing (the next event is at 37)", 35
    )


@pytest.mark.parametrize("change", ["edited", "dropped", "unreadable"])
async def test_a_tampered_segment_is_named(real_log: str, tmp_path: Path, change: str) -> None:
    rows = await _rows(real_log)
    events = [r.event for r in rows[20:35]]
    if change == "edited":
        # Whoever edited it wrote a matching checksum into its manifest too.
        events[4] = msgspec.structs.replace(events[4], payload=msgspec.Raw(b'{"n":-1}'))
    elif change == "dropped":
        del events[4]
    first = _segment(tmp_path, [r.event for r in rows[:20]], [r.chain for r in rows[:20]])
    second = _segment(tmp_path, events, [r.chain for r in rows[20:35]])
    if change == "unreadable":
        second = second._replace(problem="its checksum differs from its manifest's")
    if change == "dropped":
        second = second._replace(last=35, size=15)

    found = verify_history(rows[35:], segments=[first, second])

    assert isinstance(found, Broken)
    if change == "dropped":
        assert (found.position, found.kind, found.verified) == (25, "deleted rows", 24)
        assert found.detail.endswith(
            f"(the next event is at 26; within the range of {second.name})"
        )
    else:
        assert (found.position, found.kind, found.verified) == (21, "tampered segment", 20)
        assert found.detail.startswith(second.name)


async def test_an_imported_log_holds_the_chain_values_its_original_held(
    real_log: str, tmp_path: Path
) -> None:
    original = await _rows(real_log)
    copy = f"sqlite+aiosqlite:///{tmp_path / 'imported.db'}"
    await upgrade_database(copy)
    engine = create_engine(copy, pool_size=1)
    try:
        await import_events(engine, (row.event for row in original))
    finally:
        await engine.dispose()

    assert await _rows(copy) == original


async def test_verify_reads_the_segments_a_purge_archived_beside_the_table(
    database_url: str, tmp_path: Path
) -> None:
    archive = tmp_path / "log-archive"
    env = {
        "DATABASE_URL": database_url,
        "LOG_ARCHIVE_DIR": str(archive),
        "RETENTION_RULES": "agent/heartbeat=1s,agent=90d",
        "RETENTION_BATCH_EVENTS": "50",
    }
    async with open_store(database_url) as store:
        for round_ in range(20):
            kind = "progress" if round_ % 5 == 0 else "heartbeat"
            await store.append(
                [NewEvent("agent", f"run-{n}", kind, _new("x", n).payload) for n in range(6)]
            )
    await asyncio.sleep(1.1)
    purged = await run_cli("log", "purge", env=env)
    assert purged.code == 0, purged.stderr
    assert len(list(archive.glob("*.ndjson.gz"))) > 1

    done = await run_cli("audit", "verify", env=env)
    assert done.code == 0, done
    assert done.stdout.startswith("verified 120 events, head 120 (chain ")

    damaged = sorted(archive.glob("*.ndjson.gz"))[1]
    damaged.write_bytes(damaged.read_bytes()[:-8])
    done = await run_cli("audit", "verify", env=env)
    assert done.code == 1, done
    assert "tampered segment" in done.stdout
    assert damaged.name in done.stdout
