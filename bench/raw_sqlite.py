"""The physical limit of the event log: raw sqlite3 inserts with the service's schema."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from app.database import upgrade_database
from app.events.envelope import new_event_ids

__all__ = ["raw_sqlite_rate"]

SOURCES = 100
_INSERT = (
    "INSERT INTO events (position, stream, source_id, version, event, event_id, timestamp,"
    " payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)

Row = tuple[int, str, str, int, str, str, str, str]


def _payload(n: int) -> dict[str, object]:
    return {"agent_name": "bench", "status": "running", "message": f"step {n}", "progress": 0.5}


def _prepare_rows(rows: int) -> list[Row]:
    timestamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    # The ids the service writes (time-ordered version 7 UUIDs): random ones would make every
    # row rewrite its own page of the event_id index, and the limit would be set too low.
    ids = new_event_ids(rows)
    return [
        (
            n + 1,
            "agent",
            f"bench-{n % SOURCES}",
            n // SOURCES + 1,
            "progress",
            ids[n],
            timestamp,
            json.dumps(_payload(n), separators=(",", ":")),
        )
        for n in range(rows)
    ]


def raw_sqlite_rate(path: Path, rows: int, batch: int = 1000) -> float:
    """Insert ``rows`` events into a new database at ``path``; return rows per second.

    Each batch is its own ``BEGIN IMMEDIATE`` transaction, committed with
    ``synchronous=FULL``, so the figure includes one fsync per batch like a durable append.
    """
    if path.exists():
        raise FileExistsError(f"{path} exists; raw_sqlite_rate only writes to a new file")
    prepared = _prepare_rows(rows)
    # The service's own schema (same indexes), so both sides write the same b-trees.
    asyncio.run(upgrade_database(f"sqlite+aiosqlite:///{path}"))
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        started = time.perf_counter()
        for offset in range(0, rows, batch):
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(_INSERT, prepared[offset : offset + batch])
            connection.execute("COMMIT")
        elapsed = time.perf_counter() - started
        stored = connection.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        connection.close()
    if stored != rows:
        raise RuntimeError(f"expected {rows} rows, found {stored}")
    return rows / elapsed


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    with tempfile.TemporaryDirectory() as directory:
        rate = raw_sqlite_rate(Path(directory) / "events.db", count, size)
    print(f"raw sqlite: {rate:,.0f} rows/s ({count} rows, batches of {size})")
