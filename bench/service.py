"""The service measured in-process: durable appends through the store, and a log filled
through it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec

from app.database import create_engine, upgrade_database
from app.eventlog import EventStore, NewEvent

__all__ = ["fill_log", "service_append_rate"]


def _payload(n: int) -> msgspec.Raw:
    return msgspec.Raw(
        msgspec.json.encode(
            {"agent_name": "bench", "status": "running", "message": f"step {n}", "progress": 0.5}
        )
    )


async def _open_store(path: Path) -> tuple[EventStore, object]:
    url = f"sqlite+aiosqlite:///{path}"
    await upgrade_database(url)
    engine = create_engine(url, pool_size=4)
    store = await EventStore.open(engine)
    return store, engine


async def service_append_rate(path: Path, rows: int, producers: int = 100) -> float:
    """Durable appends through the store: ``producers`` tasks, one event per call."""
    store, engine = await _open_store(path)
    events = [
        NewEvent(
            stream="agent", source_id=f"bench-{n % 100}", event="progress", payload=_payload(n)
        )
        for n in range(rows)
    ]
    per_producer = [events[i::producers] for i in range(producers)]

    async def produce(mine: list[NewEvent]) -> None:
        for event in mine:
            await store.append_one(event)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for mine in per_producer:
            group.create_task(produce(mine))
    elapsed = time.perf_counter() - started
    head = await store.head()
    await store.close()
    await engine.dispose()  # type: ignore[attr-defined]
    if head != rows:
        raise RuntimeError(f"expected {rows} events, the log holds {head}")
    return rows / elapsed


async def fill_log(path: Path, rows: int) -> None:
    store, engine = await _open_store(path)
    for first in range(0, rows, 1000):
        await store.append(
            [
                NewEvent(
                    stream="agent",
                    source_id=f"bench-{n % 100}",
                    event="progress",
                    payload=_payload(n),
                )
                for n in range(first, min(first + 1000, rows))
            ]
        )
    await store.close()
    await engine.dispose()  # type: ignore[attr-defined]
