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


def _open(path: Path) -> SqliteWriter:
    asyncio.run(upgrade_database(f"sqlite+aiosqlite:///{path}"))
    writer = SqliteWriter(path, busy_timeout_ms=10_000, cache_kib=1024)
    writer.connect()
    return writer


def _fill(writer: SqliteWriter, commits: int, *, size: int = 500) -> None:
    for n in range(commits):
        batch = [
            NewEvent(
                "agents", f"s{n % 7}", "progress", canonical_payload({"n": n, "x": "y" * size})
            )
            for _ in range(20)
        ]
        plan = writer.commit([batch])
        assert not isinstance(plan, Exception), plan


def test_steady_appends_keep_the_wal_bounded_though_no_commit_copies_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints, "CHECKPOINT_SECONDS", 0.02)
    monkeypatch.setattr(checkpoints, "RESTART_FRAMES", 200)
    path = tmp_path / "events.db"
    writer = _open(path)
    largest = 0
    try:
        for _ in range(400):
            _fill(writer, 1)
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


def test_past_the_mark_background_writes_are_held_back_until_the_writer_has_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints, "CHECKPOINT_SECONDS", 0.02)
    monkeypatch.setattr(checkpoints, "RESTART_FRAMES", 100)
    path = tmp_path / "events.db"
    writer = _open(path)
    try:
        assert not writer.restarting()
        # One transaction past the mark: no copy by the writer can come between.
        _fill(writer, 1, size=40_000)
        deadline = time.monotonic() + 10
        while not writer.restarting() and time.monotonic() < deadline:
            time.sleep(0.005)
        # Past the mark, and nothing written since: what can wait should.
        assert writer.restarting()
        # The checkpointer's rounds leave the writer only what came after them, and the
        # writer's next transaction copies it and lets the WAL start over.
        while writer.restarting() and time.monotonic() < deadline:
            _fill(writer, 1, size=10)
            time.sleep(0.005)
        assert not writer.restarting()
        _fill(writer, 1, size=10)
        # A checkpoint that finds the checkpointer's running answers -1: ask again.
        with sqlite3.connect(path) as connection:
            for _ in range(500):
                _busy, frames, _copied = connection.execute(
                    "PRAGMA wal_checkpoint(PASSIVE)"
                ).fetchone()
                if frames >= 0:
                    break
                time.sleep(0.002)
    finally:
        writer.close()
    # The WAL holds only what came after it started over, where the first commit filled
    # hundreds of frames.
    assert 0 < frames < 50, f"the WAL did not start over ({frames} frames)"


def test_the_checkpointer_syncs_what_it_copied_so_the_writer_has_little_to_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_sync = checkpoints._sync

    def sync(descriptor: int) -> None:
        synced.append(descriptor)
        real_sync(descriptor)

    monkeypatch.setattr(checkpoints, "_sync", sync)
    path = tmp_path / "events.db"
    writer = _open(path)
    try:
        _fill(writer, 20)
        copier = checkpoints.Checkpointer(path, interval=0.01)
        copier.start()
        try:
            deadline = time.monotonic() + 10
            while not synced and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            copier.stop()
    finally:
        writer.close()
    frames, copied = copier.last
    assert copied > 0
    assert copied == frames
    assert synced, "a round copied pages into the database file and did not sync it"
