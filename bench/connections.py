"""Many idle SSE connections on one instance: held with heartbeats while appends continue.

    python -m bench.connections [--connections 2000] [--seconds 60] [--burst 5] [--every 3]

Starts ``python -m app serve`` on a scratch SQLite log (loopback only), opens ``connections``
``GET /events/stream`` connections (plain sockets with a minimal HTTP/1.1 chunked reader, so
that the client's own cost per connection stays small), measures the server's RSS before and
after they are all open and idle (memory per idle connection), then holds them for
``seconds`` while one writer appends a burst of ``burst`` events every ``every`` seconds (with
heartbeats in between, ``HEARTBEAT_SECONDS`` = 1). At the end every connection must have
received every event, once, in order, and its heartbeats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.load import free_port, start_server, stop_server, wait_ready

__all__ = ["Result", "main", "run"]


@dataclass
class Connection:
    ids: list[int] = field(default_factory=list)
    heartbeats: int = 0
    shutdown: bool = False
    error: str | None = None


@dataclass
class Result:
    connections: int
    seconds: float
    events: int
    rss_before_mb: float
    rss_connected_mb: float
    rss_end_mb: float
    kib_per_idle_connection: float
    complete: int
    last_event_delivered_to_all_s: float
    heartbeats_min: int
    errors: list[str]


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _raise_open_files(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _frames(body: bytes, connection: Connection) -> bytes:
    """Consume whole frames from ``body``; returns the rest."""
    *frames, rest = body.split(b"\n\n")
    for frame in frames:
        if frame.startswith(b"id: "):
            connection.ids.append(int(frame[4 : frame.index(b"\n")]))
        elif b"event: heartbeat" in frame:
            connection.heartbeats += 1
        elif b"event: shutdown" in frame:
            connection.shutdown = True
    return rest


async def _hold(
    port: int, connection: Connection, opened: asyncio.Event, stop: asyncio.Event
) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        connection.error = f"connect: {exc}"
        opened.set()
        return
    try:
        writer.write(b"GET /events/stream HTTP/1.1\r\nHost: bench\r\nLast-Event-ID: 0\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            connection.error = head.split(b"\r\n", 1)[0].decode()
            return
        opened.set()
        pending = b""
        stopping = asyncio.ensure_future(stop.wait())
        while True:
            size_line = asyncio.ensure_future(reader.readuntil(b"\r\n"))
            done, _ = await asyncio.wait((size_line, stopping), return_when=asyncio.FIRST_COMPLETED)
            if size_line not in done:
                size_line.cancel()
                return
            size = int(size_line.result().split(b";")[0], 16)
            if size == 0:
                return
            chunk = await reader.readexactly(size + 2)
            pending = _frames(pending + chunk[:-2], connection)
    except (OSError, asyncio.IncompleteReadError) as exc:
        connection.error = f"read: {exc!r}"
    finally:
        opened.set()
        writer.close()


async def _append(base_url: str, burst: int, every: float, seconds: float) -> int:
    count = 0
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for _ in range(burst):
                response = await client.post(
                    f"/agents/bench-{count % 10}/events",
                    json={"event": "progress", "payload": {"agent_name": "bench", "n": count}},
                )
                response.raise_for_status()
                count += 1
            await asyncio.sleep(every)
    return count


async def run(
    connections: int,
    seconds: float,
    burst: int = 5,
    every: float = 3.0,
    heartbeat: float = 1.0,
    *,
    quiet: bool = False,
) -> Result:
    _raise_open_files(connections * 2 + 1024)
    scratch = Path(tempfile.mkdtemp(prefix="bench-connections-"))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    process = start_server(
        [sys.executable, "-m", "app", "serve", "--log-level", "warning"],
        port,
        {
            "DATABASE_URL": f"sqlite+aiosqlite:///{scratch / 'events.db'}",
            "SURREALDB_URL": "mem://",
            "ARCHIVE_DIR": str(scratch / "archive"),
            "HEARTBEAT_SECONDS": str(heartbeat),
        },
    )
    try:
        await asyncio.to_thread(wait_ready, base_url, 60, process)
        # The server's own limit on open files is inherited from ours, raised above.
        before = _rss_bytes(process.pid)
        stop = asyncio.Event()
        held = [Connection() for _ in range(connections)]
        tasks = []
        for start in range(0, connections, 100):
            openings = []
            for connection in held[start : start + 100]:
                opened = asyncio.Event()
                openings.append(opened)
                tasks.append(asyncio.create_task(_hold(port, connection, opened, stop)))
            await asyncio.gather(*(event.wait() for event in openings))
        await asyncio.sleep(max(3 * heartbeat, 2.0))  # idle, heartbeats flowing
        connected = _rss_bytes(process.pid)
        if not quiet:
            print(f"{connections} connections open; RSS {before / 2**20:.0f} -> "
                  f"{connected / 2**20:.0f} MiB", flush=True)  # fmt: skip
        await _append(base_url, burst, every, seconds)
        # The log's head: our appends and whatever the service appended itself (the watchdog
        # marks the bench's activities stalled after three quiet heartbeat periods).
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            events = int((await client.get("/events", params={"limit": 1})).json()["head"])
        # Until the last event has reached everyone (or a minute has passed).
        started = time.monotonic()
        for _ in range(600):
            if all(c.error or (c.ids and c.ids[-1] >= events) for c in held):
                break
            await asyncio.sleep(0.1)
        delivered_in = time.monotonic() - started
        end = _rss_bytes(process.pid)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        stop_server(process)
    expected = list(range(1, events + 1))
    errors = [c.error for c in held if c.error][:10]
    return Result(
        connections=connections,
        seconds=seconds,
        events=events,
        rss_before_mb=round(before / 2**20, 1),
        rss_connected_mb=round(connected / 2**20, 1),
        rss_end_mb=round(end / 2**20, 1),
        kib_per_idle_connection=round((connected - before) / connections / 1024, 1),
        complete=sum(1 for c in held if c.ids == expected),
        last_event_delivered_to_all_s=round(delivered_in, 2),
        heartbeats_min=min(c.heartbeats for c in held),
        errors=errors,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--burst", type=int, default=5, help="events appended per burst")
    parser.add_argument("--every", type=float, default=3.0, help="seconds between bursts")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="HEARTBEAT_SECONDS")
    args = parser.parse_args(argv)
    result = asyncio.run(
        run(args.connections, args.seconds, args.burst, args.every, args.heartbeat)
    )
    print(json.dumps(result.__dict__, indent=2))
    ok = result.complete == result.connections and not result.errors and result.heartbeats_min > 0
    print("every connection received every event" if ok else "FAILED: see complete/errors")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
