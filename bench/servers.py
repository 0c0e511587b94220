"""The same service under uvicorn (uvloop, httptools) and under granian, measured alike.

    python -m bench.servers [--quick] [--rounds N]

``python -m app serve --http-server NAME`` on a fresh SQLite file, one server per measurement,
the two alternating round by round (A B A B). Figures: single appends over HTTP (50
clients on keep-alive sockets), batch appends of 100 events per request (50 clients), SSE
replay of 100,000 events to one client, and fan-out to 500 idle SSE subscribers: events
appended one at a time, each timed from just before its POST until every subscriber has it.
With the rates, the CPU time the server's processes used per event in the same runs: on two
shared cores a server can post a better rate by using a second core (granian parses HTTP on
its own threads) without being cheaper.

Everything else (application, database, settings, load client) is identical, so the ratios
are the cost of the server itself: its HTTP parsing, its ASGI bridge and its socket writes.
uvicorn is the reference (ratio > 1: uvicorn better).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from bench.load import (
    free_port,
    post_events_raw,
    raise_open_files,
    sse_replay,
    start_server,
    stop_server,
    wait_ready,
)
from bench.report import Figure, render
from bench.service import fill_log

__all__ = ["SERVERS", "fan_out_latency", "main", "run"]

SERVERS = ("uvicorn", "granian")
REFERENCE = "uvicorn"
CLIENTS = 50
BATCH = 100
REPLAY = 100_000
SUBSCRIBERS = 500

Measure = Callable[[str], Awaitable[dict[str, float]]]


def _unavailable(name: str) -> str | None:
    """Why ``name`` cannot run here, or None."""
    if importlib.util.find_spec(name) is None:
        return f"{name} is not installed (pip install -e '.[bench]')"
    return None


class _Subscriber:
    """One SSE connection on a plain socket: a minimal HTTP/1.1 chunked reader that stamps
    the arrival time of every event id."""

    def __init__(self, port: int, arrived: dict[int, list[float]]) -> None:
        self.port = port
        self.arrived = arrived
        self.opened = asyncio.Event()
        self.error: str | None = None

    async def hold(self, stop: asyncio.Event) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError as exc:
            self.error = f"connect: {exc}"
            self.opened.set()
            return
        try:
            writer.write(b"GET /events/stream HTTP/1.1\r\nHost: bench\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                self.error = head.split(b"\r\n", 1)[0].decode()
                return
            stopping = asyncio.ensure_future(stop.wait())
            pending = b""
            while True:
                size_line = asyncio.ensure_future(reader.readuntil(b"\r\n"))
                done, _ = await asyncio.wait(
                    (size_line, stopping), return_when=asyncio.FIRST_COMPLETED
                )
                if size_line not in done:
                    size_line.cancel()
                    return
                size = int(size_line.result().split(b";")[0], 16)
                if size == 0:
                    return
                chunk = await reader.readexactly(size + 2)
                now = time.perf_counter()
                *frames, pending = (pending + chunk[:-2]).split(b"\n\n")
                for frame in frames:
                    if frame.startswith(b"id: "):
                        self.arrived.setdefault(int(frame[4 : frame.index(b"\n")]), []).append(now)
                    elif frame.startswith(b"retry: "):
                        self.opened.set()
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.error = f"read: {exc!r}"
        finally:
            self.opened.set()
            writer.close()


async def fan_out_latency(
    base_url: str, subscribers: int = SUBSCRIBERS, events: int = 20, every: float = 0.05
) -> dict[str, float]:
    """Open ``subscribers`` SSE connections, append ``events`` one at a time (``every``
    seconds apart) and time each from just before its POST to its arrival at every
    subscriber. Returns the median delivery latency over all (event, subscriber) pairs and
    the median, over events, of the time until the last subscriber had it (milliseconds)."""
    port = httpx.URL(base_url).port
    assert port is not None
    arrived: dict[int, list[float]] = {}
    held = [_Subscriber(port, arrived) for _ in range(subscribers)]
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    sent: dict[int, float] = {}
    try:
        for first in range(0, subscribers, 100):
            group = held[first : first + 100]
            tasks.extend(asyncio.create_task(s.hold(stop)) for s in group)
            await asyncio.wait_for(asyncio.gather(*(s.opened.wait() for s in group)), 60)
        errors = [s.error for s in held if s.error]
        if errors:
            raise RuntimeError(f"{len(errors)} subscribers failed: {errors[0]}")
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            for n in range(events):
                started = time.perf_counter()
                response = await client.post(
                    "/agents/fan-out/events",
                    json={"event": "progress", "payload": {"agent_name": "bench", "n": n}},
                )
                if response.status_code != 201:
                    raise RuntimeError(f"POST -> {response.status_code}: {response.text[:200]}")
                sent[int(response.json()["position"])] = started
                await asyncio.sleep(every)
        deadline = time.monotonic() + 30
        while any(len(arrived.get(p, ())) < subscribers for p in sent):
            if time.monotonic() > deadline:
                missing = sum(subscribers - len(arrived.get(p, ())) for p in sent)
                raise RuntimeError(f"{missing} deliveries missing after 30 s")
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    every_delivery = [(t - sent[p]) * 1000 for p in sent for t in arrived[p]]
    last_delivery = [(max(arrived[p]) - sent[p]) * 1000 for p in sent]
    return {
        "fanout_p50": statistics.median(every_delivery),
        "fanout_all": statistics.median(last_delivery),
    }


def _tree_cpu_seconds(pid: int) -> float:
    """User and system CPU time used so far by ``pid`` and every process under it (granian's
    workers, and each one's SQLite writer process)."""
    ticks = 0
    pending = [pid]
    while pending:
        process = pending.pop()
        found = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(process)],
            capture_output=True,
            text=True,
            check=False,
        )
        pending.extend(int(child) for child in found.stdout.split())
        try:
            stat = Path(f"/proc/{process}/stat").read_text()
        except FileNotFoundError:
            continue
        fields = stat.rsplit(") ", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _copy_database(source: Path, target: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        found = Path(f"{source}{suffix}")
        if found.exists():
            shutil.copyfile(found, f"{target}{suffix}")


class _Runs:
    """Starts ``python -m app serve --http-server NAME`` on a fresh log for one measurement."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.count = 0
        self.replay_template: Path | None = None

    async def replay_log(self) -> Path:
        """A copy of a log of :data:`REPLAY` events, filled once."""
        if self.replay_template is None:
            self.replay_template = self.scratch / "replay-template.db"
            await fill_log(self.replay_template, REPLAY)
        self.count += 1
        copy = self.scratch / f"replay-{self.count}.db"
        await asyncio.to_thread(_copy_database, self.replay_template, copy)
        return copy

    async def measure(
        self, server: str, measure: Measure, database: Path | None = None
    ) -> tuple[dict[str, float], float]:
        """The measurement's figures, and the CPU seconds the server spent during it."""
        self.count += 1
        database = database or self.scratch / f"{server}-{self.count}.db"
        env = {
            "DATABASE_URL": f"sqlite+aiosqlite:///{database}",
            "SURREALDB_URL": "mem://",
            "ARCHIVE_DIR": str(self.scratch / "archive"),
            "HEARTBEAT_SECONDS": "15",
        }
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "app", "serve", "--log-level", "warning"]
        process = start_server([*command, "--http-server", server], port, env)
        try:
            await asyncio.to_thread(wait_ready, base_url, 60.0, process)
            cpu = await asyncio.to_thread(_tree_cpu_seconds, process.pid)
            found = await measure(base_url)
            cpu = await asyncio.to_thread(_tree_cpu_seconds, process.pid) - cpu
            return found, cpu
        finally:
            await asyncio.to_thread(stop_server, process)


async def run(quick: bool, rounds: int) -> list[Figure]:
    sizes = {
        "http_single": 5_000 if quick else 20_000,
        "http_batch": 50_000 if quick else 200_000,
        "fanout_events": 20 if quick else 50,
    }
    figures = {
        "http_single": Figure(
            "servers.http_single",
            f"append over HTTP, single endpoint, {CLIENTS} clients",
            "events/s",
        ),
        "http_batch": Figure(
            "servers.http_batch",
            f"append over HTTP, batch endpoint ({BATCH}/request), {CLIENTS} clients",
            "events/s",
        ),
        "replay": Figure("servers.replay", "SSE replay of 100k events to one client", "events/s"),
        "http_single_cpu": Figure(
            "servers.http_single_cpu",
            "server CPU per 1,000 single appends (same runs)",
            "CPU ms",
            higher_is_better=False,
        ),
        "http_batch_cpu": Figure(
            "servers.http_batch_cpu",
            "server CPU per 1,000 batched appends (same runs)",
            "CPU ms",
            higher_is_better=False,
        ),
        "replay_cpu": Figure(
            "servers.replay_cpu",
            "server CPU per 1,000 replayed events (same runs)",
            "CPU ms",
            higher_is_better=False,
        ),
        "fanout_p50": Figure(
            "servers.fanout_p50",
            f"fan-out to {SUBSCRIBERS} SSE subscribers, median delivery latency",
            "ms",
            higher_is_better=False,
        ),
        "fanout_all": Figure(
            "servers.fanout_all",
            f"fan-out to {SUBSCRIBERS} SSE subscribers, time until all have an event (median)",
            "ms",
            higher_is_better=False,
        ),
    }
    for figure in figures.values():
        figure.reference = REFERENCE
    runnable = []
    for server in SERVERS:
        reason = _unavailable(server)
        if reason is None:
            runnable.append(server)
            continue
        print(f"skipping {server}: {reason}", file=sys.stderr)
        for figure in figures.values():
            figure.skip(server, reason)
    raise_open_files(SUBSCRIBERS * 2 + 1024)

    async def single(base_url: str) -> dict[str, float]:
        rate = await post_events_raw(base_url, CLIENTS, sizes["http_single"], None)
        return {"http_single": rate}

    async def batched(base_url: str) -> dict[str, float]:
        rate = await post_events_raw(base_url, CLIENTS, sizes["http_batch"], BATCH)
        return {"http_batch": rate}

    async def replay(base_url: str) -> dict[str, float]:
        return {"replay": await sse_replay(base_url, "/events/stream", REPLAY, 0)}

    async def fan_out(base_url: str) -> dict[str, float]:
        return await fan_out_latency(base_url, SUBSCRIBERS, sizes["fanout_events"])

    # The figures a measurement fills, the measurement, whether it reads the replay log, and
    # how many events it moves (for the server's CPU per event; 0: not reported).
    measures: list[tuple[tuple[str, ...], Measure, bool, int]] = [
        (("http_single", "http_single_cpu"), single, False, sizes["http_single"]),
        (("http_batch", "http_batch_cpu"), batched, False, sizes["http_batch"]),
        (("replay", "replay_cpu"), replay, True, REPLAY),
        (("fanout_p50", "fanout_all"), fan_out, False, 0),
    ]
    failures: dict[tuple[str, str], str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-servers-") as directory:
        runs = _Runs(Path(directory))
        for round_number in range(rounds):
            print(f"round {round_number + 1}/{rounds}", file=sys.stderr)
            for keys, measure, prefilled, events in measures:
                for server in runnable:
                    database = await runs.replay_log() if prefilled else None
                    try:
                        found, cpu = await runs.measure(server, measure, database)
                    except Exception as exc:  # a server that fails is reported, not fatal
                        print(f"{server}: {', '.join(keys)} failed: {exc!r}", file=sys.stderr)
                        for key in keys:
                            failures.setdefault((key, server), f"failed: {exc!r}"[:120])
                        continue
                    for key, value in found.items():
                        figures[key].add(server, value)
                    if events:
                        figures[f"{keys[0]}_cpu"].add(server, cpu / events * 1_000_000)
    # A round that failed shows as a smaller n; a server that never succeeded, as skipped.
    for (key, server), reason in failures.items():
        if server not in figures[key].samples:
            figures[key].skip(server, reason)
    order = ["http_single", "http_single_cpu", "http_batch", "http_batch_cpu", "replay"]
    order += ["replay_cpu", "fanout_p50", "fanout_all"]
    return [figures[key] for key in order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, 2 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per figure (default 3)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    print(render(asyncio.run(run(args.quick, rounds))))


if __name__ == "__main__":
    main()
