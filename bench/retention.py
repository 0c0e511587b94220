"""Does a purge hold up appends? Append latency while retention archives and removes a
large log, against the same appends on the same log with no purge.

    python -m bench.retention                      # 1,000,000 expired events, 3 rounds
    python -m bench.retention --events 200000      # quicker

A SQLite log of ``--events`` agent events, all older than the rule ``agent/progress=7d``
(bulk-filled once, chain values included, then copied for every run), is opened in this
process with the service's default appender (a writer process). 20 producers append one
event at a time (``append_one``: each returns once its commit is durable) while, in the
*purge* run, the service's retention archives and removes every expired event (all but each
source's newest) in batches of ``--batch`` events; the *baseline* run appends to a fresh copy
for as long as the purge run took, with no purge. Each round does both (purge first: its
duration is the baseline's); medians over the rounds of append p50/p99 and appends/s, and the
purge's rate, with the ratios purge / baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

from app.config import DatabaseSettings
from app.config.retention import parse_rule
from app.database import create_engine
from app.eventlog import EventStore, NewEvent, canonical_payload
from app.eventlog.retention import Retention
from app.events.chain import GENESIS, chain_rows
from bench.export_memory import fill_log

__all__ = ["main"]

PRODUCERS = 20
RULES = [parse_rule("agent/progress=7d")]


class Run(NamedTuple):
    p50_ms: float
    p99_ms: float
    appends_per_second: float
    seconds: float
    purged: int


def fill(path: Path, count: int) -> float:
    """The template log: ``count`` old agent events with their chain values; seconds."""
    started = time.perf_counter()
    fill_log(path, count)
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute("BEGIN")
        previous, after = GENESIS, 0
        while rows := connection.execute(
            "SELECT position, stream, source_id, version, event, event_id, timestamp, payload"
            " FROM events WHERE position > ? ORDER BY position LIMIT 50000",
            (after,),
        ).fetchall():
            values = chain_rows(previous, rows)
            connection.executemany(
                "UPDATE events SET chain = ? WHERE position = ?",
                [(value, row[0]) for row, value in zip(rows, values, strict=True)],
            )
            previous, after = values[-1], rows[-1][0]
        connection.execute("COMMIT")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()
    return time.perf_counter() - started


def copy_log(template: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    target = into / "events.db"
    shutil.copyfile(template, target)
    return target


async def append_load(
    store: EventStore, stop: asyncio.Event, latencies: list[float], rate: float
) -> int:
    """``PRODUCERS`` producers appending one event at a time until ``stop``: as fast as
    acknowledgements come back (``rate`` 0), or each on a fixed schedule adding up to
    ``rate`` appends/s, with each latency counted from the event's scheduled time, so that a
    stall counts for every append it delays (no coordinated omission)."""
    loop = asyncio.get_running_loop()
    interval = PRODUCERS / rate if rate else 0.0

    async def produce(producer: int) -> int:
        count = 0
        due = loop.time() + interval * producer / PRODUCERS
        while not stop.is_set():
            if interval:
                await asyncio.sleep(max(0.0, due - loop.time()))
                started = due
                due += interval
            else:
                started = loop.time()
            event = NewEvent(
                "agent",
                f"live-{producer}",
                "progress",
                canonical_payload({"agent_name": "bench", "n": count}),
            )
            await store.append_one(event)
            latencies.append(loop.time() - started)
            count += 1
        return count

    return sum(await asyncio.gather(*(produce(n) for n in range(PRODUCERS))))


async def one_run(
    path: Path,
    archive: Path,
    *,
    purge: bool,
    seconds: float,
    batch: int,
    delete_rows: int,
    rate: float,
) -> Run:
    url = f"sqlite+aiosqlite:///{path}"
    engine = create_engine(url, pool_size=4)
    try:
        store = await EventStore.open(engine, DatabaseSettings(url=url))
        try:
            # Warm: the writer process started, the first commit made.
            await store.append_one(NewEvent("agent", "warm", "progress", canonical_payload({})))
            stop = asyncio.Event()
            latencies: list[float] = []
            load = asyncio.create_task(append_load(store, stop, latencies, rate))
            started = time.perf_counter()
            purged = 0
            if purge:
                retention = Retention(
                    store,
                    RULES,
                    archive,
                    batch_events=batch,
                    delete_rows=delete_rows,
                    clock=lambda: datetime.now(UTC) + timedelta(days=1),
                )
                purged = (await retention.purge()).removed
            else:
                await asyncio.sleep(seconds)
            elapsed = time.perf_counter() - started
            stop.set()
            appended = await load
        finally:
            await store.close()
    finally:
        await engine.dispose()
    latencies.sort()
    return Run(
        p50_ms=latencies[len(latencies) // 2] * 1000,
        p99_ms=latencies[int(len(latencies) * 0.99)] * 1000,
        appends_per_second=appended / elapsed,
        seconds=elapsed,
        purged=purged,
    )


def _median(runs: list[Run], field: str) -> float:
    return statistics.median(getattr(run, field) for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="log size (expired)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=10_000, help="RETENTION_BATCH_EVENTS")
    parser.add_argument("--delete-rows", type=int, default=100, help="RETENTION_DELETE_ROWS")
    parser.add_argument(
        "--rate",
        type=float,
        default=1000.0,
        help="appends/s offered by the producers together; 0: as fast as they are acknowledged",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-retention-") as scratch:
        root = Path(scratch)
        template = root / "template.db"
        took = fill(template, args.events)
        print(f"filled {args.events:,} events in {took:.0f} s", flush=True)
        purges: list[Run] = []
        baselines: list[Run] = []
        for round_ in range(args.rounds):
            run_dir = root / f"run-{round_}"
            purged = asyncio.run(
                one_run(
                    copy_log(template, run_dir / "purge"),
                    run_dir / "archive",
                    purge=True,
                    seconds=0,
                    batch=args.batch,
                    delete_rows=args.delete_rows,
                    rate=args.rate,
                )
            )
            shutil.rmtree(run_dir)
            baseline = asyncio.run(
                one_run(
                    copy_log(template, run_dir / "baseline"),
                    run_dir / "archive",
                    purge=False,
                    seconds=purged.seconds,
                    batch=args.batch,
                    delete_rows=args.delete_rows,
                    rate=args.rate,
                )
            )
            shutil.rmtree(run_dir)
            purges.append(purged)
            baselines.append(baseline)
            print(f"round {round_ + 1}: purge {purged}; baseline {baseline}", flush=True)
    p99 = _median(purges, "p99_ms"), _median(baselines, "p99_ms")
    p50 = _median(purges, "p50_ms"), _median(baselines, "p50_ms")
    rate = _median(purges, "appends_per_second"), _median(baselines, "appends_per_second")
    seconds = _median(purges, "seconds")
    removed = _median(purges, "purged")
    print(
        f"medians of {args.rounds} rounds, {args.events:,} events, segments of {args.batch}, "
        f"{args.delete_rows} rows removed per transaction:\n"
        f"  append p99 {p99[0]:.2f} ms during the purge, {p99[1]:.2f} ms without "
        f"({p99[0] / p99[1]:.2f}x)\n"
        f"  append p50 {p50[0]:.2f} ms during, {p50[1]:.2f} ms without "
        f"({p50[0] / p50[1]:.2f}x)\n"
        f"  appends/s {rate[0]:,.0f} during, {rate[1]:,.0f} without ({rate[0] / rate[1]:.2f}x)\n"
        f"  purge: {removed:,.0f} events archived and removed in {seconds:.1f} s "
        f"({removed / seconds:,.0f} events/s)"
    )


if __name__ == "__main__":
    main()
