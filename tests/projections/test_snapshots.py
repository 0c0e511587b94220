"""Snapshots: after retention has moved events to archives, a rebuild from the newest snapshot
(folding only what follows it, archived events included) and a full rebuild from position 0
through the archives give exactly the rows the projections had folded live."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.config.retention import parse_rule
from app.eventlog import Event, EventStore, NewEvent, canonical_payload
from app.eventlog.archives import ArchiveDamaged, list_segments
from app.eventlog.retention import Retention
from app.projections import ProjectionRunner, all_projections
from app.projections.snapshots import newest_snapshot, take_snapshot
from tests.support import open_store

RULES = [parse_rule(rule) for rule in ("agent/heartbeat=7d", "agent/progress=30d")]


async def report(store: EventStore, rng: random.Random, runs: Sequence[str], rounds: int) -> None:
    """Agents starting, reporting progress, beating and finishing, interleaved."""
    for round_ in range(rounds):
        batch = []
        for run in runs:
            if round_ == 0:
                name, body = "started", {"status": "running", "message": "starting"}
            elif round_ == rounds - 1 and rng.random() < 0.7:
                name, body = rng.choice(
                    [
                        ("complete", {"status": "completed", "message": "done", "progress": 1.0}),
                        ("failed", {"status": "failed", "message": "boom"}),
                    ]
                )
            elif rng.random() < 0.6:
                name, body = "heartbeat", {}
            else:
                progress = round(rng.random(), 3)
                name, body = "progress", {"message": f"item {round_}", "progress": progress}
            payload = canonical_payload({"agent_name": run.split("-")[0], **body})
            batch.append(NewEvent("agent", run, name, payload))
        await store.append(batch)


async def tables_of(runner: ProjectionRunner) -> dict[str, list[tuple[Any, ...]]]:
    found = {}
    async with runner._engine.connect() as connection:
        for projection in runner.projections.values():
            for table in projection.tables:
                key = list(table.primary_key.columns)
                rows = (await connection.execute(select(table).order_by(*key))).all()
                found[table.name] = [tuple(row) for row in rows]
    return found


def count_folds(runner: ProjectionRunner) -> list[int]:
    """The positions every projection of ``runner`` is given to fold from now on."""
    folded: list[int] = []
    for projection in runner.projections.values():
        original = projection.apply

        async def apply(connection: Any, events: Sequence[Event], original: Any = original) -> None:
            folded.extend(event.position for event in events)
            await original(connection, events)

        projection.apply = apply  # type: ignore[method-assign]
    return folded


async def test_a_rebuild_from_a_snapshot_gives_what_a_full_rebuild_through_archives_gives(
    database_url: str, tmp_path: Path
) -> None:
    rng = random.Random(24)
    archive = tmp_path / "log-archive"
    runs = [f"{name}-{n}" for name in ("tagger", "summarizer") for n in range(6)]
    async with open_store(database_url) as store:
        runner = ProjectionRunner(store.engine, all_projections(), store=store)
        await report(store, rng, runs, 30)
        await runner._catch_up_together(sorted(runner.projections))
        snapshots = [
            await take_snapshot(store.engine, projection)
            for projection in runner.projections.values()
        ]
        at = snapshots[0].position
        assert at == await store.head()
        assert {s.position for s in snapshots} == {at}
        await report(store, rng, [f"late-{n}" for n in range(4)] + runs[:3], 25)
        await runner._catch_up_together(sorted(runner.projections))
        live = await tables_of(runner)

        # Retention archives heartbeats and progress on both sides of the snapshot.
        retention = Retention(
            store,
            RULES,
            archive,
            batch_events=50,
            clock=lambda: datetime.now(UTC) + timedelta(days=31),
        )
        result = await retention.purge()
        assert result.removed > 0
        assert min(s.first_position for s in result.segments) < at
        assert max(s.last_position for s in result.segments) > at

        folded = count_folds(runner)
        await runner.rebuild_together(sorted(runner.projections), archive_dir=archive)
        from_snapshot = await tables_of(runner)
        assert folded
        assert min(folded) > at
        assert from_snapshot == live

        folded.clear()
        await runner.rebuild_together(
            sorted(runner.projections), archive_dir=archive, from_snapshots=False
        )
        full = await tables_of(runner)
        assert min(folded) == 1
        assert full == live

        # Without the archive, the full rebuild cannot be whole: it refuses, and changes
        # nothing.
        async with store.engine.connect() as connection:
            first = (await list_segments(connection))[0]
            assert (await newest_snapshot(connection, "agents")) is not None
        (archive / first.name).unlink()
        with pytest.raises(ArchiveDamaged, match=first.name):
            await runner.rebuild_together(
                sorted(runner.projections), archive_dir=archive, from_snapshots=False
            )
        assert await tables_of(runner) == live
