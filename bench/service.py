"""The service measured in-process: durable appends through the store, and a log filled
through it."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec

from app.config import DatabaseSettings
from app.database import create_engine, upgrade_database
from app.eventlog import EventStore, NewEvent
from bench.load import (
    free_port,
    post_events_raw,
    start_server,
    stop_server,
    wait_projected,
    wait_ready,
)

__all__ = ["Servers", "fill_log", "service_append_rate"]


def _payload(n: int) -> msgspec.Raw:
    return msgspec.Raw(
        msgspec.json.encode(
            {"agent_name": "bench", "status": "running", "message": f"step {n}", "progress": 0.5}
        )
    )


async def _open_store(
    path: Path, appender: str = "process", chain: bool = True
) -> tuple[EventStore, object]:
    url = f"sqlite+aiosqlite:///{path}"
    await upgrade_database(url)
    engine = create_engine(url, pool_size=4)
    settings = DatabaseSettings(sqlite_appender=appender, audit_chain=chain)
    store = await EventStore.open(engine, settings)
    return store, engine


async def service_append_rate(
    path: Path, rows: int, producers: int = 100, appender: str = "process", chain: bool = True
) -> float:
    """Durable appends through the store: ``producers`` tasks, one event per call, written
    by the SQLite ``appender`` (``process`` or ``thread``), chained or not (AUDIT_CHAIN)."""
    store, engine = await _open_store(path, appender, chain)
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


class Servers:
    """Start the service (on a fresh SQLite file) or the naive peer for one measurement."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.count = 0

    def _database(self) -> Path:
        self.count += 1
        return self.scratch / f"service-{self.count}.db"

    async def run_service(
        self,
        measure: Callable[[str], Awaitable[float]],
        prefill: int = 0,
        env: dict[str, str] | None = None,
    ) -> float:
        """Start the service with ``env`` on top of its benchmark settings and measure it."""
        database = self._database()
        if prefill:
            await fill_log(database, prefill)
        env = {
            "DATABASE_URL": f"sqlite+aiosqlite:///{database}",
            # The content store is not measured; in memory, several runs never share a path.
            "SURREALDB_URL": "mem://",
            "HEARTBEAT_SECONDS": "15",
            **(env or {}),
        }

        async def projected(base_url: str) -> float:
            # A pre-filled log is folded into the projections first: a running service has.
            if prefill:
                await asyncio.to_thread(wait_projected, base_url)
            return await measure(base_url)

        return await self._run(
            [sys.executable, "-m", "app", "serve", "--log-level", "warning"], env, projected
        )

    async def run_naive(
        self, measure: Callable[[str], Awaitable[float]], prefill: int = 0
    ) -> float:
        async def filled(base_url: str) -> float:
            if prefill:
                await post_events_raw(base_url, 4, prefill, 1000)
            return await measure(base_url)

        return await self._run([sys.executable, "-m", "bench.peers.naive"], {}, filled)

    @staticmethod
    async def _run(
        command: list[str], env: dict[str, str], measure: Callable[[str], Awaitable[float]]
    ) -> float:
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        process = start_server(command, port, env)
        try:
            await asyncio.to_thread(wait_ready, base_url, 60.0, process)
            return await measure(base_url)
        finally:
            stop_server(process)
