"""PostgreSQL's appender under another writer's lock: what waits for the lock commits together,
in one transaction, once it is free."""

from __future__ import annotations

import asyncio

import asyncpg

from app.backends.postgres.appender import APPEND_LOCK_KEY, postgres_dsn
from app.eventlog import NewEvent, canonical_payload
from tests.support import open_store

DEADLINE = 30.0


def new(n: int) -> NewEvent:
    return NewEvent(
        stream="agents",
        source_id=f"s{n % 3}",
        event="progress",
        payload=canonical_payload({"agent_name": "probe", "n": n}),
    )


async def waiting_for_the_lock(admin: asyncpg.Connection) -> None:
    for _ in range(int(DEADLINE / 0.01)):
        if await admin.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the appender did not wait for the lock within {DEADLINE} s")


async def test_appends_arriving_while_another_instance_holds_the_lock_commit_together(
    postgres_url: str,
) -> None:
    async with open_store(postgres_url) as store:
        await store.append_one(new(0))
        before = store.metrics.transactions
        other = await asyncpg.connect(postgres_dsn(postgres_url))
        try:
            # Another instance's append transaction, holding the log's lock.
            transaction = other.transaction()
            await transaction.start()
            await other.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
            first = asyncio.create_task(store.append_one(new(1)))
            await waiting_for_the_lock(other)
            # These arrive while the appender waits for the lock.
            rest = [asyncio.create_task(store.append_one(new(n))) for n in range(2, 51)]
            await asyncio.sleep(0.1)
            await transaction.commit()
            results = await asyncio.wait_for(asyncio.gather(first, *rest), DEADLINE)
        finally:
            await other.close()
        assert [result.position for result in results] == list(range(2, 52))
        # One transaction took all fifty, not the first alone and the rest after it.
        assert store.metrics.transactions - before == 1
        page = await store.read_after(0)
        assert [event.position for event in page.events] == list(range(1, 52))
