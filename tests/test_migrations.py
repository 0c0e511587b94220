from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sys
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

import app.projections  # noqa: F401  (as in migrations/env.py: every table on the metadata)
from app.database import create_engine, metadata, upgrade_database
from app.eventlog import EventStore, NewEvent, canonical_payload
from app.eventlog import tables as _event_tables  # noqa: F401
from app.projections import AgentProjection, ProjectionRunner
from app.projections.agents import agent_activities
from tests.support import ROOT

T = TypeVar("T")


def _drift(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection,
        opts={"compare_type": True, "render_as_batch": connection.dialect.name == "sqlite"},
    )
    diffs: list[Any] = compare_metadata(context, metadata)
    return diffs


def _revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _schema(connection: Connection) -> dict[str, Any]:
    """Every table with its columns and indexes, plus the objects' identities: a migration
    that dropped and re-created something would change them."""
    inspector = inspect(connection)
    shape = {
        table: (
            [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)],
            sorted(
                (i["name"] or "", tuple(i["column_names"])) for i in inspector.get_indexes(table)
            ),
        )
        for table in sorted(inspector.get_table_names())
    }
    if connection.dialect.name == "sqlite":
        # SQLite bumps this on every schema change, however small.
        identity: Any = connection.exec_driver_sql("PRAGMA schema_version").scalar_one()
    else:
        identity = [
            tuple(row)
            for row in connection.exec_driver_sql(
                "SELECT relname, oid::bigint, relfilenode::bigint FROM pg_class "
                "WHERE relnamespace = 'public'::regnamespace ORDER BY relname"
            )
        ]
    return {"shape": shape, "identity": identity}


def _head_revision() -> str | None:
    return ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini"))).get_current_head()


async def _inspect(url: str, check: Callable[[Connection], T]) -> T:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(check)
    finally:
        await engine.dispose()


async def _assert_at_head_without_drift(url: str) -> None:
    assert await _inspect(url, _drift) == []
    assert await _inspect(url, _revision) == _head_revision()
    tables = set((await _inspect(url, _schema))["shape"])
    assert tables == {*metadata.tables, "alembic_version"}


async def test_upgrade_of_an_empty_database_matches_the_models(database_url: str) -> None:
    assert await _inspect(database_url, _revision) is None

    await upgrade_database(database_url)

    await _assert_at_head_without_drift(database_url)


async def test_a_second_upgrade_changes_nothing_and_keeps_the_data(database_url: str) -> None:
    await upgrade_database(database_url)
    engine = create_engine(database_url, pool_size=2)
    try:
        store = await EventStore.open(engine)
        try:
            appended = await store.append_one(
                NewEvent("agent", "a1", "started", canonical_payload({"agent_name": "tagger"}))
            )
        finally:
            await store.close()
    finally:
        await engine.dispose()
    before = await _inspect(database_url, _schema)

    await upgrade_database(database_url)

    assert await _inspect(database_url, _schema) == before
    assert await _inspect(database_url, _revision) == _head_revision()

    def read_events(connection: Connection) -> list[tuple[Any, ...]]:
        return [
            tuple(row) for row in connection.execute(text("SELECT position, event_id FROM events"))
        ]

    assert await _inspect(database_url, read_events) == [(1, appended.event_id)]


async def test_concurrent_upgrades_in_one_process_all_succeed(database_url: str) -> None:
    # Two services opened at once in one process each migrate on start.
    results = await asyncio.gather(
        *(upgrade_database(database_url) for _ in range(3)), return_exceptions=True
    )

    assert [r for r in results if isinstance(r, BaseException)] == []
    await _assert_at_head_without_drift(database_url)


async def test_concurrent_upgrades_from_separate_processes_all_succeed(database_url: str) -> None:
    # Instances (or `serve --workers N`) starting together on one database each run the
    # migrations; none may fail because another got there first, and none may apply one twice.
    env = {**os.environ, "DATABASE_URL": database_url}
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app",
            "db",
            "upgrade",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(3)
    ]
    outputs = await asyncio.gather(
        *(asyncio.wait_for(process.communicate(), 120) for process in processes)
    )

    failures = [
        (process.returncode, stderr.decode()[-2000:])
        for process, (_, stderr) in zip(processes, outputs, strict=True)
        if process.returncode != 0
    ]
    assert failures == []
    await _assert_at_head_without_drift(database_url)


def _migrate(url: str, revision: str, *, down: bool = False) -> None:
    from alembic import command

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    (command.downgrade if down else command.upgrade)(config, revision)


def _activity_rows(connection: Connection) -> list[dict[str, Any]]:
    """The rows with the columns the table has at the current revision."""
    query = text(f"SELECT * FROM {agent_activities.name} ORDER BY source_id")
    return [dict(row._mapping) for row in connection.execute(query)]


async def test_stalled_rows_projected_before_stalled_at_are_migrated_as_a_rebuild_makes_them(
    database_url: str,
) -> None:
    # Before revision 2664f5e7e900 the fold moved last_seen to the watchdog's stalled mark.
    before_stalled_at = "8e999b42f1e4"
    await upgrade_database(database_url)
    engine = create_engine(database_url, pool_size=2)
    try:
        store = await EventStore.open(engine)
        try:
            for source_id, kinds in (
                ("quiet", ("started", "progress", "stalled")),
                ("revived", ("started", "stalled", "heartbeat")),
                ("busy", ("started", "progress")),
            ):
                for kind in kinds:
                    if kind == "stalled":
                        await asyncio.sleep(0.01)  # marked a few ms after the agent spoke
                    payload = canonical_payload({"agent_name": "tagger", "message": kind})
                    await store.append_one(NewEvent("agent", source_id, kind, payload))
            head = await store.head()
        finally:
            await store.close()
        assert await ProjectionRunner(engine, [AgentProjection()]).rebuild("agents") == head
    finally:
        await engine.dispose()
    rebuilt = await _inspect(database_url, _activity_rows)
    quiet = next(row for row in rebuilt if row["source_id"] == "quiet")
    assert quiet["last_seen"] < quiet["stalled_at"] == quiet["updated_at"]

    # Down to the earlier fold's rows: last_seen is the latest event's time, mark included.
    await asyncio.to_thread(_migrate, database_url, before_stalled_at, down=True)
    earlier = await _inspect(database_url, _activity_rows)
    assert [row["last_seen"] for row in earlier] == [row["updated_at"] for row in rebuilt]
    assert all("stalled_at" not in row for row in earlier)

    await upgrade_database(database_url)

    assert await _inspect(database_url, _activity_rows) == rebuilt
    await _assert_at_head_without_drift(database_url)


def _compact(payload: dict[str, Any]) -> str:
    return str(canonical_payload(payload), "utf-8")


def _chained_events(connection: Connection) -> list[tuple[Any, ...]]:
    query = text(
        "SELECT position, stream, source_id, version, event, event_id, timestamp, payload, chain"
        " FROM events ORDER BY position"
    )
    return [tuple(row) for row in connection.execute(query)]


def _chain_as_documented(rows: list[tuple[Any, ...]]) -> list[bytes]:
    """The chain computed from docs/architecture.md's description alone, as an auditor would."""
    previous, values = bytes(32), []
    for row in rows:
        canonical = "\n".join(str(field) for field in row[:8]).encode("utf-8")
        previous = hashlib.sha256(previous + canonical).digest()
        values.append(previous)
    return values


async def test_the_chain_revision_computes_every_existing_events_chain_in_position_order(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    before_chain = "2664f5e7e900"
    await upgrade_database(database_url)
    await asyncio.to_thread(_migrate, database_url, before_chain, down=True)
    engine = create_engine(database_url, pool_size=2)
    try:
        async with engine.begin() as connection:
            # Rows as a log written before the chain holds them: no chain column at all.
            await connection.execute(
                text(
                    "INSERT INTO events (position, stream, source_id, version, event, event_id,"
                    " timestamp, payload) VALUES (:position, 'agent', :source, :version,"
                    " 'progress', :event_id, '2026-12-07T12:00:00.000Z', :payload)"
                ),
                [
                    {
                        "position": position,
                        "source": f"a{position % 7}",
                        "version": (position + 6) // 7,
                        "event_id": str(uuid.UUID(int=position)),
                        "payload": _compact({"message": f'café "{position}"', "n": position}),
                    }
                    for position in range(1, 12_001)
                ],
            )
    finally:
        await engine.dispose()

    with caplog.at_level(logging.INFO, logger="app.migrations"):
        await upgrade_database(database_url)

    rows = await _inspect(database_url, _chained_events)
    assert [row[8] for row in rows] == _chain_as_documented(rows)
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("chain:")]
    assert progress[-1] == "chain: 12000 of 12000 events (position 12000)"
    await _assert_at_head_without_drift(database_url)
