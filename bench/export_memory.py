"""Does ``python -m app export`` stream? Peak memory and throughput against the log's size.

    python -m bench.export_memory                   # 1,000,000 events against 100,000
    python -m bench.export_memory --events 200000   # quicker

Fills SQLite logs in bulk (raw sqlite3 inserts into the migrated schema), then runs the real
command, ``python -m app export --after 0`` as a child process writing to /dev/null, and reads
the child's own peak RSS from ``wait4``. An empty export (``--until 0``) gives what the
interpreter and the imports alone take. Memory that does not grow with the log shows as a
ratio near 1 between the sizes; throughput is events per second of the whole command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import NamedTuple

from app.database import upgrade_database

__all__ = ["fill_log", "measure_export"]

ROOT = Path(__file__).resolve().parent.parent
SOURCES = 1000
_INSERT = (
    "INSERT INTO events (position, stream, source_id, version, event, event_id, timestamp,"
    " payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def fill_log(path: Path, count: int, chunk: int = 50_000) -> float:
    """A migrated SQLite log at ``path`` holding ``count`` agent events; returns seconds."""
    started = time.perf_counter()
    asyncio.run(upgrade_database(f"sqlite+aiosqlite:///{path}"))
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        # A bench fixture, not the service's write path: no fsync per transaction.
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute("BEGIN")
        for start in range(0, count, chunk):
            rows = []
            for n in range(start, min(start + chunk, count)):
                source = n % SOURCES
                rows.append(
                    (
                        n + 1,
                        "agent",
                        f"tagger_{source:06d}",
                        n // SOURCES + 1,
                        "progress",
                        str(uuid.uuid4()),
                        "2025-01-24T12:34:56.789Z",
                        '{"agent_name":"tagger","status":"running","message":"Processing video '
                        f'{n % 10 + 1}/10","progress":{(n % 10) / 10}}}',
                    )
                )
            connection.executemany(_INSERT, rows)
        connection.execute("COMMIT")
    finally:
        connection.close()
    return time.perf_counter() - started


class Measured(NamedTuple):
    events: int
    seconds: float
    peak_rss_mb: float


def measure_export(path: Path, events: int, *args: str) -> Measured:
    """Run the export command on the log at ``path`` to /dev/null; its time and peak RSS."""
    env = {**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{path}"}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "export", "--after", "0", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    # wait4 gives this child's own peak RSS (getrusage(RUSAGE_CHILDREN) would give the
    # largest of all children so far).
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"export exited with {process.returncode}")
    # ru_maxrss is in kilobytes on Linux.
    return Measured(events, seconds, usage.ru_maxrss / 1024)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.export_memory", description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000, help="the big log's size")
    parser.add_argument(
        "--baseline", type=int, default=100_000, help="the small log's size (default 100,000)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="export-memory-") as directory:
        results: list[Measured] = []
        for count in (args.baseline, args.events):
            path = Path(directory) / f"log-{count}.db"
            filled = fill_log(path, count)
            print(f"filled {count:,} events in {filled:.1f} s", file=sys.stderr)
            if not results:
                results.append(measure_export(path, 0, "--until", "0"))
            results.append(measure_export(path, count))
    empty, small, big = results
    print(f"{'events':>10}  {'seconds':>8}  {'events/s':>9}  {'peak RSS':>9}")
    for found in results:
        rate = f"{found.events / found.seconds:,.0f}" if found.events else "-"
        print(
            f"{found.events:>10,}  {found.seconds:>8.2f}  {rate:>9}  {found.peak_rss_mb:>6.1f} MB"
        )
    print(
        f"peak RSS {big.events:,} / {small.events:,} events: "
        f"{big.peak_rss_mb / small.peak_rss_mb:.2f}x for {big.events / small.events:.0f}x the "
        f"events (above the empty export: {big.peak_rss_mb - empty.peak_rss_mb:.1f} MB vs "
        f"{small.peak_rss_mb - empty.peak_rss_mb:.1f} MB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
