"""Projection writes kept to be made later by the log's writer: compiled to the same SQL and
values SQLAlchemy would send, made only while the checkpoints they were folded at still hold,
and never holding appends."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    delete,
    select,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.backends import GuardedWrite, upsert
from app.database import create_engine
from app.eventlog import LogUnavailable
from app.projections.deferred import DeferredWrites, compile_write
from app.projections.stats import EVENTS_TOTAL, RECENT_KEEP, stats_counters, stats_recent
from app.runtime.services import Services
from tests.support import new_agent_event, open_store, sqlite_settings

metadata = MetaData()
items = Table(
    "test_items",
    metadata,
    Column("name", String(50), primary_key=True),
    Column("value", Integer, nullable=False),
    Column("note", String(50)),
)


FIRST_ROWS = [(f"n{n}", n, None) for n in range(10)]


def item_rows(path: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return connection.execute("SELECT * FROM test_items ORDER BY name").fetchall()


def make_items(path: Path) -> Path:
    path.parent.mkdir(exist_ok=True)
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute(
            "CREATE TABLE test_items (name VARCHAR(50) PRIMARY KEY, value INTEGER NOT NULL,"
            " note VARCHAR(50))"
        )
        connection.executemany("INSERT INTO test_items VALUES (?, ?, ?)", FIRST_ROWS)
        connection.commit()
    return path


def run_compiled(path: Path, compiled: tuple[str, list[list[Any]]]) -> None:
    sql, rows = compiled
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.executemany(sql, rows)
        connection.commit()


async def run_sqlalchemy(path: Path, statement: Any, parameters: Any = None) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        async with engine.begin() as connection:
            await connection.execute(statement, parameters)
    finally:
        await engine.dispose()


def adding_upsert() -> Any:
    insert = sqlite.insert(items)
    return insert.on_conflict_do_update(
        index_elements=["name"],
        set_={"value": items.c.value + insert.excluded.value, "note": insert.excluded.note},
    )


WRITES: list[tuple[str, Any, Any]] = [
    (
        "an upsert of many rows",
        adding_upsert(),
        [{"name": "n1", "value": 5, "note": "é"}, {"name": "new", "value": 7, "note": None}],
    ),
    (
        "an update by bound names",
        update(items)
        .where(items.c.name == bindparam("which"))
        .values(value=bindparam("to"), note="set"),
        [{"which": "n2", "to": 20}, {"which": "n3", "to": 30}],
    ),
    (
        "a delete below a subquery with a limit and an offset",
        delete(items).where(
            items.c.value
            < select(items.c.value)
            .order_by(items.c.value.desc())
            .offset(3)
            .limit(1)
            .scalar_subquery()
        ),
        None,
    ),
]


@pytest.mark.parametrize(("what", "statement", "parameters"), WRITES, ids=[w[0] for w in WRITES])
async def test_a_compiled_write_changes_what_sqlalchemy_would(
    tmp_path: Path, what: str, statement: Any, parameters: Any
) -> None:
    by_sqlalchemy = make_items(tmp_path / "a" / "items.db")
    by_compiled = make_items(tmp_path / "b" / "items.db")
    await run_sqlalchemy(by_sqlalchemy, statement, parameters)
    run_compiled(by_compiled, compile_write(statement, parameters, sqlite.dialect()))
    assert item_rows(by_compiled) == item_rows(by_sqlalchemy)
    assert item_rows(by_compiled) != FIRST_ROWS  # it changed something


def test_a_write_that_cannot_be_kept_is_refused() -> None:
    # An IN list is expanded when executed: as kept SQL it would have no placeholders to fill.
    with pytest.raises(TypeError, match="cannot keep this write"):
        compile_write(delete(items).where(items.c.name.in_(["a", "b"])), None, sqlite.dialect())


async def test_deferred_writes_read_through_and_keep_what_they_write(tmp_path: Path) -> None:
    item_db = make_items(tmp_path / "items.db")
    engine = create_engine(f"sqlite+aiosqlite:///{item_db}")
    try:
        async with engine.connect() as connection:
            deferred = DeferredWrites(connection)
            found = await deferred.execute(select(items.c.value).where(items.c.name == "n4"))
            assert found.scalar_one() == 4
            writes = cast(AsyncConnection, deferred)
            await upsert(writes, items, [{"name": "n4", "value": 40, "note": None}], key=["name"])
            assert len(deferred.statements) == 1
        assert ("n4", 4, None) in item_rows(item_db)  # kept, not written
    finally:
        await engine.dispose()


def guarded(expected_value: int, statements: list[tuple[str, list[list[Any]]]]) -> GuardedWrite:
    return GuardedWrite(
        "SELECT name, value FROM test_items WHERE name = ?",
        ["guard"],
        [["guard", expected_value]],
        statements,
    )


INSERT = "INSERT INTO test_items (name, value) VALUES (?, ?)"


async def test_a_guarded_write_is_made_only_while_its_guard_holds(
    tmp_path: Path, appender: str
) -> None:
    async with open_store(sqlite_settings(tmp_path, appender), tables=metadata) as store:
        assert await store.write_guarded(guarded(0, [(INSERT, [["guard", 0]])])) is False
        rows = item_rows(tmp_path / "events.db")
        assert rows == []

        with contextlib.closing(sqlite3.connect(tmp_path / "events.db")) as other:
            other.execute(INSERT, ("guard", 1))
            other.commit()
        write = guarded(1, [(INSERT, [["a", 1], ["b", 2]]), (INSERT, [["c", 3]])])
        assert await store.write_guarded(write) is True
        assert item_rows(tmp_path / "events.db") == [
            ("a", 1, None),
            ("b", 2, None),
            ("c", 3, None),
            ("guard", 1, None),
        ]
        # Appends go on around it, positions unbroken.
        assert (await store.append_one(new_agent_event("s", "after"))).position == 1


async def test_a_guarded_write_that_fails_writes_nothing_and_says_why(
    tmp_path: Path, appender: str
) -> None:
    async with open_store(sqlite_settings(tmp_path, appender), tables=metadata) as store:
        with contextlib.closing(sqlite3.connect(tmp_path / "events.db")) as other:
            other.execute(INSERT, ("guard", 1))
            other.commit()
        # The second row breaks the primary key: the first must not stay either.
        write = guarded(1, [(INSERT, [["a", 1]]), (INSERT, [["a", 2]])])
        with pytest.raises(LogUnavailable, match="UNIQUE constraint failed"):
            await store.write_guarded(write)
        assert item_rows(tmp_path / "events.db") == [("guard", 1, None)]
        assert (await store.append_one(new_agent_event("s", "after"))).position == 1


async def test_guarded_writes_are_made_by_every_backend_s_appender(services: Services) -> None:
    store, engine = services.store, services.engine
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    dialect = engine.dialect
    guard = compile_write(
        select(items.c.name, items.c.value).where(items.c.name == "guard"), None, dialect
    )

    def write(expected: list[list[Any]], *statements: Any) -> GuardedWrite:
        sql, (parameters,) = guard
        return GuardedWrite(
            sql, parameters, expected, [compile_write(*s, dialect) for s in statements]
        )

    async def rows() -> list[tuple[Any, ...]]:
        async with engine.connect() as connection:
            found = await connection.execute(select(items).order_by(items.c.name))
            return [tuple(row) for row in found]

    insert = items.insert()
    # The guard reads no row: refused, nothing written.
    assert (
        await store.write_guarded(write([["guard", 1]], (insert, {"name": "a", "value": 1})))
        is False
    )
    assert await rows() == []
    # It reads what it expects: every statement is made, in one transaction.
    assert (
        await store.write_guarded(
            write([], (insert, [{"name": "guard", "value": 1}, {"name": "b", "value": 2}]))
        )
        is True
    )
    assert await rows() == [("b", 2, None), ("guard", 1, None)]
    # A statement the database refuses: nothing of the write stays.
    failing = write(
        [["guard", 1]], (insert, {"name": "c", "value": 3}), (insert, {"name": "b", "value": 4})
    )
    with pytest.raises(LogUnavailable):
        await store.write_guarded(failing)
    assert await rows() == [("b", 2, None), ("guard", 1, None)]
    # Appends go on around it.
    assert (await store.append_one(new_agent_event("s", "after"))).position == 1


async def stats_rows(engine: AsyncEngine) -> tuple[list[int], int]:
    async with engine.connect() as connection:
        recent = (
            (
                await connection.execute(
                    select(stats_recent.c.position).order_by(stats_recent.c.position.desc())
                )
            )
            .scalars()
            .all()
        )
        total = (
            await connection.execute(
                select(stats_counters.c.value).where(stats_counters.c.name == EVENTS_TOTAL)
            )
        ).scalar_one()
    return list(recent), int(total)


async def test_the_stats_keep_only_the_newest_finished_sources(services: Services) -> None:
    store = services.store
    finished: list[int] = []
    for start in range(0, RECENT_KEEP + 12, 7):  # several steps, several finishes in each
        batch = [
            msgspec.structs.replace(new_agent_event(f"s{n}", "done"), event="complete")
            for n in range(start, min(start + 7, RECENT_KEEP + 12))
        ]
        results = await store.append(batch)
        finished.extend(result.position for result in results)
        assert await services.projections.wait_for("stats", finished[-1], within=10)
    recent, total = await stats_rows(services.engine)
    assert recent == sorted(finished, reverse=True)[:RECENT_KEEP]
    assert total == len(finished)
