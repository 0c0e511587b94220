"""The physical limit of the event log: raw sqlite3 inserts with the service's schema."""

from __future__ import annotations

import json
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

__all__ = ["raw_sqlite_rate"]

SOURCES = 100
_SCHEMA = (
    """CREATE TABLE events (
        position INTEGER PRIMARY KEY,
        stream TEXT NOT NULL,
        source_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        event TEXT NOT NULL,
        event_id TEXT NOT NULL UNIQUE,
        timestamp TEXT NOT NULL,
        payload TEXT NOT NULL
    )""",
    "CREATE UNIQUE INDEX ix_events_source_version ON events (stream, source_id, version)",
    "CREATE INDEX ix_events_source_position ON events (stream, source_id, position)",
    "CREATE INDEX ix_events_stream_position ON events (stream, position)",
)
_INSERT = (
    "INSERT INTO events (stream, source_id, version, event, event_id, timestamp, payload)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)

Row = tuple[str, str, int, str, str, str, str]


def _payload(n: int) -> dict[str, object]:
    return {"agent_name": "bench", "status": "running", "message": f"step {n}", "progress": 0.5}


def _prepare_rows(rows: int) -> list[Row]:
    timestamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return [
        (
            "agent",
            f"bench-{n % SOURCES}",
            n // SOURCES + 1,
            "progress",
            str(uuid4()),
            timestamp,
            json.dumps(_payload(n)),
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
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        for statement in _SCHEMA:
            connection.execute(statement)
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
