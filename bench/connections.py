"""Idle SSE connections on one instance: the server's memory per connection, and the CPU its
heartbeats cost.

    python -m bench.connections [--quick] [--rounds N] [--connections N] [--window S]

A server that holds many subscribers mostly holds them idle: what matters then is what each
idle connection costs in memory, and what keeping them alive (a heartbeat per connection every
``HEARTBEAT_SECONDS``) costs in CPU. Per round, the service (``python -m app serve`` on a
scratch SQLite log) is run twice, with ``HEARTBEAT_SECONDS=1`` and with its default, then the
naive peer (:mod:`bench.peers.naive`, which sends no heartbeats) once; rounds repeat A B A B.

Each run opens ``connections`` ``GET /events/stream`` connections (5,000; 2,000 with
``--quick``) from one client process that reads them with a plain chunked-HTTP protocol (no
task per connection, so that the client keeps up with thousands of heartbeats a second), after
a few warm-up connections opened and closed. Measured on the server's process:

- memory per idle connection: RSS after the connections were held idle for the window, minus
  RSS before they were opened, over ``connections`` (``/proc/<pid>/status`` VmRSS);
- CPU over an idle window (20 s; 10 s with ``--quick``): utime + stime from
  ``/proc/<pid>/stat``, as a percentage of one core, and per heartbeat frame received by the
  client in the window (all of the server's CPU, so an upper bound on a frame's cost).

Then events are appended in bursts, and every connection must receive every event once, in
order (a run where one does not is reported as a failure). The service is stopped with its
connections open, and each must get the ``shutdown`` frame. Both processes' open-file limits
are raised (the server inherits the bench's limit).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.load import free_port, raise_open_files, start_server, stop_server, wait_ready
from bench.report import SERVICE, Figure, render

__all__ = ["NAIVE", "IdleRun", "hold_idle", "hold_service", "main", "run"]

NAIVE = "naive"
QUICK_CONNECTIONS = 2_000
FULL_CONNECTIONS = 5_000
WARM_UP = 20
#: The contract's default HEARTBEAT_SECONDS.
DEFAULT_HEARTBEAT = "15"
OPEN_BATCH = 200
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_REQUEST = b"GET /events/stream HTTP/1.1\r\nHost: bench\r\nLast-Event-ID: 0\r\n\r\n"


class _Subscriber(asyncio.Protocol):
    """One SSE connection: de-chunks the body and records ids, heartbeats and shutdown."""

    def __init__(self, opened: asyncio.Future[None]) -> None:
        self.opened = opened
        self.transport: asyncio.Transport | None = None
        self.raw = b""
        self.text = b""
        self.head_done = False
        self.ids: list[int] = []
        self.heartbeats = 0
        self.shutdown = False
        self.closed = asyncio.get_running_loop().create_future()
        self.error: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(_REQUEST)

    def data_received(self, data: bytes) -> None:
        raw = self.raw + data
        if not self.head_done:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                self.raw = raw
                return
            if not raw.startswith(b"HTTP/1.1 200"):
                self._fail(raw.split(b"\r\n", 1)[0].decode(errors="replace"))
                return
            self.head_done = True
            raw = raw[end + 4 :]
        text = self.text
        while (line_end := raw.find(b"\r\n")) >= 0:
            size = int(raw[:line_end].split(b";")[0], 16)
            start = line_end + 2
            if len(raw) < start + size + 2:
                break
            text += raw[start : start + size]
            raw = raw[start + size + 2 :]
            if size == 0:
                break
        self.raw = raw
        *frames, self.text = text.replace(b"\r\n", b"\n").split(b"\n\n")
        for frame in frames:
            if frame.startswith(b"id:"):
                self.ids.append(int(frame[3 : frame.index(b"\n")]))
            elif b"event: heartbeat" in frame:
                self.heartbeats += 1
            elif b"event: shutdown" in frame:
                self.shutdown = True
            elif frame.startswith(b"retry:") and not self.opened.done():
                self.opened.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self._fail(f"closed before the first frame: {exc!r}")
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, reason: str) -> None:
        self.error = self.error or reason
        if not self.opened.done():
            self.opened.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class IdleRun:
    """One server holding ``connections`` idle subscribers."""

    connections: int
    heartbeat: str
    rss_before_mib: float = 0.0
    rss_open_mib: float = 0.0
    rss_idle_mib: float = 0.0
    cpu_seconds: float = 0.0
    window_seconds: float = 0.0
    heartbeats: int = 0
    #: The fewest heartbeats one connection received over the whole run.
    heartbeats_min: int = 0
    events: int = 0
    complete: int = 0
    shutdown_frames: int | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def kib_per_connection(self) -> float:
        return (self.rss_idle_mib - self.rss_before_mib) * 1024 / self.connections

    @property
    def cpu_percent(self) -> float:
        return 100 * self.cpu_seconds / self.window_seconds

    @property
    def us_per_heartbeat(self) -> float | None:
        return self.cpu_seconds * 1e6 / self.heartbeats if self.heartbeats else None

    def summary(self) -> str:
        per_frame = self.us_per_heartbeat
        shutdown = (
            "" if self.shutdown_frames is None else f", shutdown frames {self.shutdown_frames}"
        )
        return (
            f"{self.connections} connections, heartbeat {self.heartbeat}: RSS "
            f"{self.rss_before_mib:.1f} -> {self.rss_open_mib:.1f} (open) -> "
            f"{self.rss_idle_mib:.1f} MiB (idle) = {self.kib_per_connection:.1f} KiB/connection; "
            f"CPU {self.cpu_percent:.2f}% of a core over {self.window_seconds:.0f} s, "
            f"{self.heartbeats} heartbeats"
            + ("" if per_frame is None else f" = {per_frame:.1f} us/frame")
            + f"; {self.complete}/{self.connections} got all {self.events} events{shutdown}"
        )


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _cpu_seconds(pid: int) -> float:
    # Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _raise_open_files(wanted: int) -> None:
    target = raise_open_files(wanted)
    if target < wanted:
        print(f"open-file limit {target} (hard limit) < {wanted} wanted", file=sys.stderr)


async def _open(port: int, count: int) -> list[_Subscriber]:
    loop = asyncio.get_running_loop()
    held: list[_Subscriber] = []
    for first in range(0, count, OPEN_BATCH):
        batch = [_Subscriber(loop.create_future()) for _ in range(min(OPEN_BATCH, count - first))]

        async def connect(subscriber: _Subscriber) -> None:
            try:
                await loop.create_connection(lambda: subscriber, "127.0.0.1", port)
            except OSError as error:
                subscriber.error = f"connect: {error}"
                subscriber.opened.set_result(None)
                return
            await subscriber.opened

        async with asyncio.timeout(60):
            await asyncio.gather(*(connect(subscriber) for subscriber in batch))
        held += batch
    return held


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


async def hold_idle(
    command: list[str],
    env: dict[str, str],
    heartbeat: str,
    connections: int,
    window: float,
    *,
    service: bool,
    deliver_seconds: float = 4.0,
) -> IdleRun:
    """Start the server, hold ``connections`` idle subscribers for ``window`` seconds, then
    check that appended events reach every one of them in order."""
    _raise_open_files(connections + WARM_UP + 1024)
    result = IdleRun(connections, heartbeat)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    process = start_server(command, port, env)
    held: list[_Subscriber] = []
    try:
        await asyncio.to_thread(wait_ready, base_url, 60, process)
        # Whatever the first streams create once per process is not a connection's cost.
        warm = await _open(port, WARM_UP)
        for subscriber in warm:
            subscriber.close()
        await asyncio.gather(*(subscriber.closed for subscriber in warm))
        await asyncio.sleep(1.0)
        result.rss_before_mib = _rss_mib(process.pid)
        held = await _open(port, connections)
        result.failures += [s.error for s in held if s.error][:5]
        await asyncio.sleep(2.0)
        result.rss_open_mib = _rss_mib(process.pid)

        cpu, beats, started = _cpu_seconds(process.pid), _heartbeats(held), time.monotonic()
        await asyncio.sleep(window)
        result.cpu_seconds = _cpu_seconds(process.pid) - cpu
        result.heartbeats = _heartbeats(held) - beats
        result.window_seconds = time.monotonic() - started
        result.rss_idle_mib = _rss_mib(process.pid)

        posted = await _append(base_url, burst=5, every=1.0, seconds=deliver_seconds)
        if service:
            # The log's head: the appends, and whatever the service appended itself (its
            # watchdog marks quiet activities stalled).
            async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
                result.events = int(
                    (await client.get("/events", params={"limit": 1})).json()["head"]
                )
        else:
            result.events = posted
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(s.error or (s.ids and s.ids[-1] >= result.events) for s in held):
                break
            await asyncio.sleep(0.1)
        result.heartbeats_min = min((s.heartbeats for s in held), default=0)
        result.complete = sum(
            1
            for s in held
            if len(s.ids) >= result.events and s.ids == list(range(1, len(s.ids) + 1))
        )
        if result.complete < connections:
            result.failures.append(
                f"{connections - result.complete} connections missed events or got them out "
                "of order"
            )
        if not service:
            # The naive peer's streams never end: hang up first, or its shutdown waits on them.
            for subscriber in held:
                subscriber.close()
    finally:
        await asyncio.to_thread(stop_server, process)
    if service and held:
        async with asyncio.timeout(30):
            await asyncio.gather(*(subscriber.closed for subscriber in held))
        result.shutdown_frames = sum(1 for s in held if s.shutdown)
        if result.shutdown_frames < connections:
            result.failures.append(
                f"{connections - result.shutdown_frames} connections got no shutdown frame"
            )
    for subscriber in held:
        subscriber.close()
    return result


async def hold_service(
    connections: int, window: float, heartbeat: str = "1", deliver_seconds: float = 4.0
) -> IdleRun:
    """:func:`hold_idle` against the service, on a scratch SQLite log."""
    with tempfile.TemporaryDirectory(prefix="bench-connections-") as directory:
        command, env = _service(Path(directory), heartbeat)
        return await hold_idle(
            command,
            env,
            f"{heartbeat} s",
            connections,
            window,
            service=True,
            deliver_seconds=deliver_seconds,
        )


def _heartbeats(held: list[_Subscriber]) -> int:
    return sum(subscriber.heartbeats for subscriber in held)


def _service(scratch: Path, heartbeat: str) -> tuple[list[str], dict[str, str]]:
    database = scratch / f"service-{time.monotonic_ns()}.db"
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{database}",
        # The content store is not measured; in memory, several runs never share a path.
        "SURREALDB_URL": "mem://",
        "ARCHIVE_DIR": str(scratch / "archive"),
        "HEARTBEAT_SECONDS": heartbeat,
    }
    return [sys.executable, "-m", "app", "serve", "--log-level", "warning"], env


async def run(
    quick: bool, rounds: int, connections: int | None = None, window: float | None = None
) -> list[Figure]:
    count = connections or (QUICK_CONNECTIONS if quick else FULL_CONNECTIONS)
    seconds = window or (10.0 if quick else 20.0)
    deliver = 3.0 if quick else 6.0
    memory = Figure(
        "idle_memory",
        f"server memory per idle SSE connection, {count:,} connections (default heartbeat)",
        "KiB/connection",
        higher_is_better=False,
        target="<= 20 KiB",
    )
    cpu_fast = Figure(
        "heartbeat_cpu",
        f"server CPU holding {count:,} idle connections, heartbeat every 1 s "
        "(naive: sends none, its cost of holding them)",
        "% of one core",
        higher_is_better=False,
    )
    cpu_default = Figure(
        "heartbeat_cpu_default",
        f"server CPU holding {count:,} idle connections, default heartbeat (naive: sends none)",
        "% of one core",
        higher_is_better=False,
    )
    per_frame = Figure(
        "heartbeat_us",
        "server CPU per heartbeat frame, heartbeat every 1 s (all of the server's CPU in "
        "the window / frames)",
        "us/frame",
        higher_is_better=False,
    )
    per_frame.skip(NAIVE, "sends no heartbeats")
    naive_command = [sys.executable, "-m", "bench.peers.naive"]
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-connections-") as directory:
        scratch = Path(directory)
        for number in range(rounds):
            print(f"idle connections: round {number + 1}/{rounds}", file=sys.stderr)
            fast = await hold_idle(
                *_service(scratch, "1"),
                "1 s",
                count,
                seconds,
                service=True,
                deliver_seconds=deliver,
            )
            _note(SERVICE, fast, failures)
            cpu_fast.add(SERVICE, fast.cpu_percent)
            if fast.us_per_heartbeat is not None:
                per_frame.add(SERVICE, fast.us_per_heartbeat)
            default = await hold_idle(
                *_service(scratch, DEFAULT_HEARTBEAT),
                f"{DEFAULT_HEARTBEAT} s (default)",
                count,
                seconds,
                service=True,
                deliver_seconds=deliver,
            )
            _note(SERVICE, default, failures)
            memory.add(SERVICE, default.kib_per_connection)
            cpu_default.add(SERVICE, default.cpu_percent)
            try:
                naive = await hold_idle(
                    naive_command,
                    {},
                    "none",
                    count,
                    seconds,
                    service=False,
                    deliver_seconds=deliver,
                )
            except Exception as error:  # a peer that fails is reported, not fatal
                print(f"naive peer failed: {error!r}", file=sys.stderr)
                for figure in (memory, cpu_fast, cpu_default):
                    figure.skip(NAIVE, f"failed: {error!r}")
                continue
            _note(NAIVE, naive, failures)
            memory.add(NAIVE, naive.kib_per_connection)
            cpu_fast.add(NAIVE, naive.cpu_percent)
            cpu_default.add(NAIVE, naive.cpu_percent)
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return [memory, cpu_fast, cpu_default, per_frame]


def _note(name: str, result: IdleRun, failures: list[str]) -> None:
    print(f"  {name}: {result.summary()}", file=sys.stderr)
    failures += [f"{name} (heartbeat {result.heartbeat}): {f}" for f in result.failures]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 connections, 10 s windows")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; 2 quick)")
    parser.add_argument("--connections", type=int, default=None, help="connections per run")
    parser.add_argument("--window", type=float, default=None, help="idle window, seconds")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 3)
    figures = asyncio.run(run(args.quick, rounds, args.connections, args.window))
    print(render(figures))


if __name__ == "__main__":
    main()
