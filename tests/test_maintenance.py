"""The running service applies the retention rules in the background, beside appends and a
live tail that misses nothing, and snapshots its projections as their checkpoints move."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import select

from app.eventlog import EventFilter, NewEvent, canonical_payload, replay_then_tail
from app.eventlog.archives import list_segments
from app.projections.snapshots import newest_snapshot
from app.runtime.services import open_services
from tests.support import eventually, make_settings


async def test_the_service_purges_and_snapshots_in_the_background(
    database_url: str, tmp_path: Path
) -> None:
    settings = make_settings(
        database_url,
        AGENTS_AUTO_RUN="false",
        INGEST_CONCURRENCY="0",
        AGENT_RUN_CONCURRENCY="0",
        HEARTBEAT_SECONDS="60",
        LOG_ARCHIVE_DIR=str(tmp_path / "log-archive"),
        RETENTION_RULES="agent/heartbeat=1s",
        RETENTION_INTERVAL_SECONDS="0.3",
        RETENTION_BATCH_EVENTS="50",
        SNAPSHOT_EVERY_EVENTS="200",
    )
    async with open_services(settings) as services:
        store = services.store
        tailed: list[int] = []

        async def tail() -> None:
            async for entries in replay_then_tail(store, 0, EventFilter(), idle_timeout=0.2):
                tailed.extend(entry.position for entry in entries)

        follower = asyncio.create_task(tail())
        appended: list[int] = []
        try:
            for round_ in range(40):
                results = await store.append(
                    [
                        NewEvent(
                            "agent",
                            f"run-{n}",
                            "heartbeat",
                            canonical_payload({"agent_name": "tagger", "n": round_}),
                        )
                        for n in range(10)
                    ]
                )
                appended.extend(result.position for result in results)
                await asyncio.sleep(0.05)

            # Every heartbeat but each source's newest goes within a few intervals, and the
            # snapshot taken after the purge that removed the last of them follows.
            # The table is read before the segments: a purge that commits between the two
            # reads then shows up in the segments too, never in the table alone.
            for _ in range(300):
                purged = len((await store.read_after(0, limit=1000)).events) == 10
                async with store.engine.connect() as connection:
                    segments = await list_segments(connection)
                    snapshot = await newest_snapshot(connection, "agents")
                    rows = (
                        await connection.execute(select(*services.projections.get("agents").tables))
                    ).all()
                last = max((segment.last_position for segment in segments), default=0)
                if purged and snapshot is not None and snapshot.position >= last:
                    break
                await asyncio.sleep(0.1)
            assert sum(segment.count for segment in segments) == 390
            assert all(segment.count <= 50 for segment in segments)
            # A snapshot past the removed events: a rebuild needs no archive for them.
            assert snapshot is not None
            assert snapshot.position >= max(segment.last_position for segment in segments)
            assert len(rows) == 10
            # The live tail had every event, in order, once.
            assert await eventually(lambda: len(tailed) >= len(appended))
            assert tailed == appended
        finally:
            follower.cancel()
