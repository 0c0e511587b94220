"""The log's WAL is copied into the database beside the writer's commits, and stays bounded."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from app.backends.sqlite import checkpoints
from app.backends.sqlite.writer import SqliteWriter
from app.database import upgrade_database
from app.eventlog import NewEvent, canonical_payload

PAGE = 4096


def test_steady_appends_keep_the_wal_bounded_though_no_commit_copies_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints, "CHECKPOINT_SECONDS", 0.02)
    monkeypatch.setattr(checkpoints, "RESTART_FRAMES", 200)
    path = tmp_path / "events.db"
    asyncio.run(upgrade_database(f"sqlite+aiosqlite:///{path}"))
    writer = SqliteWriter(path, busy_timeout_ms=10_000, cache_kib=1024)
    writer.connect()
    largest = 0
    try:
        for n in range(400):
            batch = [
                NewEvent(
                    "agents", f"s{n % 7}", "progress", canonical_payload({"n": n, "x": "y" * 500})
                )
                for _ in range(20)
            ]
            plan = writer.commit([batch])
            assert not isinstance(plan, Exception), plan
            largest = max(largest, (path.parent / "events.db-wal").stat().st_size)
            time.sleep(0.002)
    finally:
        writer.close()
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT count(*), max(position) FROM events").fetchone() == (
            8000,
            8000,
        )
        (written,) = connection.execute("SELECT sum(length(payload)) FROM events").fetchone()
    # The payloads alone fill over 800 pages, and each commit writes a page of every index too:
    # a WAL that no one copied, or that never started over, would hold all of it.
    assert written > 800 * PAGE
    assert largest < 4 * 200 * (PAGE + 24), f"the WAL grew to {largest} bytes"
